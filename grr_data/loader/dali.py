"""The DALI loader: JPEG decoding, bilinear resize and normalisation on the GPU (CPU without one).

Design choice: DALI is fed with `fn.external_source` from the same per-rank plan as the CPU
loader (`plan.py`), not through `fn.readers.webdataset`. The Python source only reads encoded
bytes at known offsets (`os.pread`, ~40 KB a sample; measured ~38,000 samples/s on one busy
core from page cache, far above what one GPU trains this model on), so the expensive work
(decoding on nvJPEG, the hardware decoder taking `hw_decoder_load` of it where present;
resize; normalise) stays in DALI, and the loader gets exactly the CPU loader's sharding, epoch
coverage, padding and resume position for free. The webdataset reader reads shards in order
with its own shuffle buffer and shard split, so resuming mid-epoch exactly and matching the
CPU loader's order would not be possible. The cost: random access reads over the whole split
(fine on local disks or page cache, slower on network filesystems) and one Python callback a
batch on the main thread (prefetch_queue_depth batches ahead).

Without a GPU (`device="cpu"`) the same pipeline runs with `device_id=None` on CPU operators;
tests use it to check DALI against the CPU loader.

Failed decodes: DALI stops a whole batch on one bad JPEG. The loader then decodes the
batches from the failing one on with Pillow to find the culprits, remembers them, and rebuilds
the pipeline at the failing batch with those samples replaced (the rule in `base.py`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from grr_data.loader.base import IMAGE_SIZE, MEAN, STD, LoaderBase, fill_batch, plan_after
from grr_data.loader.cpu import decode_image
from grr_data.loader.source import SampleError

log = logging.getLogger("grr.loader")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliLoader(LoaderBase):
    name = "dali"

    def __init__(
        self,
        shards,
        plan,
        device="cpu",
        dtype=torch.float32,
        with_keys=False,
        num_threads: int = 4,
        prefetch: int = 2,
        hw_decoder_load: float = 0.65,
    ):
        super().__init__(shards, plan, device, dtype, with_keys)
        from nvidia.dali import types

        # crop_mirror_normalize writes float32 or float16; bfloat16 is cast in torch.
        dali_dtypes = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}
        if dtype not in dali_dtypes:
            raise ValueError(f"dtype {dtype} is not a training dtype; use float32, float16 or bfloat16")
        self.dali_dtype = dali_dtypes[dtype]
        self.num_threads, self.prefetch, self.hw_decoder_load = num_threads, prefetch, hw_decoder_load
        self._bad: dict[int, tuple[str, str]] = {}  # sample -> (reason, message), found so far

    def _read_slot(self, g: int, events: list):
        if g in self._bad:
            events.append((g, *self._bad[g]))
            return None
        try:
            jpg, ids = self.shards.read(g)
        except SampleError as err:
            self._bad[g] = (err.reason, str(err))
            events.append((g, *self._bad[g]))
            return None
        return np.frombuffer(jpg, dtype=np.uint8), ids, np.array([g], dtype=np.int64)

    def _fallback(self, batches: np.ndarray, after: int):
        # Every sample of the batch failed: the first sample after it in the plan that decodes.
        for g in plan_after(batches, after):
            slot = self._read_slot(int(g), [])
            if slot is not None and self._check(int(g), slot[0]):
                return slot
        raise RuntimeError(f"{self.shards.root}: no sample of this rank's plan can be decoded")

    def _check(self, g: int, jpg: np.ndarray) -> bool:
        try:
            decode_image(jpg.tobytes(), draft=False)
        except SampleError as err:
            self._bad[g] = (err.reason, str(err))
            return False
        return True

    def _source(self, batches: np.ndarray, start: int, events: dict):
        def source(info):
            b = start + info.iteration
            if b >= len(batches):
                raise StopIteration
            events[b] = []
            slots = fill_batch(
                [self._read_slot(int(g), events[b]) for g in batches[b]], lambda: self._fallback(batches, b)
            )
            return tuple([s[k] for s in slots] for k in range(3))

        return source

    def _device_id(self) -> int:
        # "cuda" without an index means the current device (what DDP ranks set), not GPU 0.
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _pipeline(self, source):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(
            batch_size=self.plan.batch_size,
            num_threads=self.num_threads,
            device_id=self._device_id() if gpu else None,
            prefetch_queue_depth=self.prefetch,
        )
        def pipe():
            jpegs, ids, nums = fn.external_source(
                source,
                num_outputs=3,
                batch_info=True,
                dtype=[types.UINT8, types.INT64, types.INT64],
                ndim=[1, 1, 1],
            )
            if gpu:
                images = fn.decoders.image(
                    jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=self.hw_decoder_load
                )
            else:
                images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            images = fn.resize(
                images, size=[IMAGE_SIZE, IMAGE_SIZE], interp_type=types.INTERP_LINEAR, antialias=True
            )
            images = fn.crop_mirror_normalize(
                images,
                dtype=self.dali_dtype,
                output_layout="CHW",
                mean=[m * 255 for m in MEAN],
                std=[s * 255 for s in STD],
            )
            return images, ids, nums

        return pipe()

    def _find_bad(self, batches: np.ndarray, b: int) -> bool:
        """Decode the batches DALI may have been working on with Pillow; True if a culprit was found."""
        found = False
        for g in batches[b : b + self.prefetch + 2].reshape(-1):
            slot = self._read_slot(int(g), [])
            if slot is not None and not self._check(int(g), slot[0]):
                found = True
        return found

    def _iter_batches(self, batches, start):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cuda = self.device.type == "cuda"
        b = start
        while b < len(batches):
            events: dict[int, list] = {}
            pipe = it = None
            try:
                pipe = self._pipeline(self._source(batches, b, events))
                # The plan pads every batch to full size, so the policy never has to act.
                it = DALIGenericIterator(
                    pipe, ["images", "ids", "nums"], auto_reset=False, last_batch_policy=LastBatchPolicy.FILL
                )
                for out in it:
                    out = out[0]
                    for g, reason, message in events.pop(b, []):
                        self._skips.add(reason, lambda g=g: self.shards.describe(g), message)
                    batch = {
                        "images": out["images"].to(self.device, self.dtype, non_blocking=cuda),
                        "ids": out["ids"].to(self.device, non_blocking=cuda),
                    }
                    if self.with_keys:
                        batch["keys"] = [self.shards.key(int(g)) for g in out["nums"][:, 0]]
                    b += 1
                    yield batch
            except RuntimeError as err:
                if not self._find_bad(batches, b):
                    raise
                log.debug("DALI failed near batch %d (%s); rebuilding without the bad samples", b, err)
            finally:
                del it, pipe
