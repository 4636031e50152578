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
(fine on local disks or page cache, slower on network filesystems). The reads run on a
background thread (`reader.py`), in plan order; the callback DALI calls on the training thread
only takes the next batch's bytes. DALI works `prefetch` batches ahead: a trainer that takes
several micro-batches before launching GPU work asks for more than it takes (make_loader).

Output memory: DALI's default (dynamic) executor hands out its own GPU buffers through DLPack,
not copies: a batch's `images` (and, on the GPU, `ids`) are DALI-owned device memory that stays
valid until the consumer drops the tensors, and is never overwritten by later batches. No copy
is made (it would cost a device copy per batch and gain nothing).

Without a GPU (`device="cpu"`) the same pipeline runs with `device_id=None` on CPU operators;
tests use it to check DALI against the CPU loader. Both decoders use libjpeg-turbo's "fancy"
chroma upsampling, as Pillow does, so the GPU output matches the CPU loader's.

Every sample is verified where its bytes are read (`ShardSet.read` on the reader thread: CRC32s
and the vocabulary); one that fails never reaches DALI and is replaced as the CPU loader does.

Failed decodes: DALI stops a whole batch on one bad JPEG. The loader then decodes, with
Pillow, the batches from the failing one to the last one handed to DALI, to find the culprits,
remembers them, and rebuilds the pipeline at the failing batch with those samples replaced (the
rule in `base.py`). If Pillow finds no culprit (DALI rejects a batch Pillow reads), that batch
is decoded with Pillow (as `preprocess_image` does), counted in `fallback_batches` and logged,
and the pipeline is rebuilt at the next batch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from grr_data.loader.base import IMAGE_SIZE, MEAN, STD, LoaderBase, fill_batch, normalize, plan_after
from grr_data.loader.cpu import decode_image
from grr_data.loader.reader import BatchReader
from grr_data.loader.source import SampleError

log = logging.getLogger("grr.loader")
DEFAULT_PREFETCH = 2


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _Feed:
    """What one pipeline reads: batches `start..` of the plan through a BatchReader; remembers
    the skip events of each batch and the last batch handed to DALI."""

    def __init__(self, loader: DaliLoader, batches: np.ndarray, start: int):
        self.start, self.served, self.error = start, start - 1, None
        self.events: dict[int, list] = {}
        self.reader = BatchReader(
            lambda b: loader._payload(batches, b), start, len(batches), loader.prefetch, name="grr-dali-reader"
        )

    def __call__(self, info):
        b = self.start + info.iteration
        try:
            payload, events = self.reader.get(b)
        except StopIteration:
            raise
        except BaseException as err:
            self.error = err  # not DALI's failure: the loader raises it as it is
            raise
        self.events[b], self.served = events, b
        return payload

    def close(self) -> None:
        self.reader.close()


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
        prefetch: int | None = None,
        hw_decoder_load: float = 0.65,
    ):
        super().__init__(shards, plan, device, dtype, with_keys)
        from nvidia.dali import types

        # crop_mirror_normalize writes float32 or float16; bfloat16 is cast in torch.
        dali_dtypes = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}
        if dtype not in dali_dtypes:
            raise ValueError(f"dtype {dtype} is not a training dtype; use float32, float16 or bfloat16")
        if prefetch is not None and prefetch < 1:
            raise ValueError(f"prefetch must be at least 1 batch, got {prefetch}")
        self.dali_dtype = dali_dtypes[dtype]
        self.num_threads, self.hw_decoder_load = num_threads, hw_decoder_load
        self.prefetch = prefetch or DEFAULT_PREFETCH
        self.fallback_batches = 0  # batches DALI rejected but Pillow decoded
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

    def _decode(self, g: int, jpg: np.ndarray) -> np.ndarray | None:
        """Pillow's (288, 288, 3) uint8 for sample g, or None (remembered as bad) when it fails."""
        try:
            return decode_image(jpg.tobytes(), draft=False)
        except SampleError as err:
            self._bad[g] = (err.reason, str(err))
            return None

    def _fallback(self, batches: np.ndarray, after: int):
        # Every sample of the batch failed: the first sample after it in the plan that decodes.
        for g in plan_after(batches, after):
            slot = self._read_slot(int(g), [])
            if slot is not None and self._decode(int(g), slot[0]) is not None:
                return slot
        raise RuntimeError(f"{self.shards.root}: no sample of this rank's plan can be decoded")

    def _payload(self, batches: np.ndarray, b: int):
        """Batch b as external_source wants it ([jpegs], [ids], [numbers]) and its skip events;
        runs on the reader thread."""
        events: list = []
        slots = fill_batch(
            [self._read_slot(int(g), events) for g in batches[b]], lambda: self._fallback(batches, b)
        )
        return tuple([s[k] for s in slots] for k in range(3)), events

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
            decoder = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load} if gpu else {"device": "cpu"}
            images = fn.decoders.image(jpegs, output_type=types.RGB, jpeg_fancy_upsampling=True, **decoder)
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
            # ids go to the GPU inside DALI; sample numbers stay on the CPU (keys, the real mask).
            return images, ids.gpu() if gpu else ids, nums

        return pipe()

    def _find_bad(self, batches: np.ndarray, b: int, last: int) -> bool:
        """Decode batches b..last (those DALI may have been working on) with Pillow; True if a
        culprit was found."""
        found = False
        for g in batches[b : last + 1].reshape(-1):
            slot = self._read_slot(int(g), [])
            if slot is not None and self._decode(int(g), slot[0]) is None:
                found = True
        return found

    def _record(self, events: list) -> None:
        for g, reason, message in events:
            self._skips.add(reason, lambda g=g: self.shards.describe(g), message)

    def _pillow_batch(self, batches: np.ndarray, b: int, err: Exception) -> dict:
        """Batch b decoded with Pillow, for a batch DALI rejects though Pillow reads all of it."""
        events: list = []
        slots = []
        for g in batches[b]:
            slot = self._read_slot(int(g), events)
            if slot is not None and (pixels := self._decode(int(g), slot[0])) is not None:
                slot = (pixels, *slot[1:])
            elif slot is not None:
                events.append((int(g), *self._bad[int(g)]))
                slot = None
            slots.append(slot)

        def substitute():
            jpg, ids, num = self._fallback(batches, b)  # it checked that jpg decodes
            return self._decode(int(num[0]), jpg), ids, num

        slots = fill_batch(slots, substitute)
        self._record(events)
        self.fallback_batches += 1
        log.warning(
            "DALI failed on batch %d of epoch %d (%s) but Pillow decodes every sample of it: decoded it "
            "with Pillow instead (%d such batches so far)", b, self.epoch, err, self.fallback_batches
        )
        pixels = torch.from_numpy(np.stack([s[0] for s in slots])).to(self.device)  # (B, 288, 288, 3) uint8
        return {
            "images": normalize(pixels, self.dtype),
            "ids": torch.from_numpy(np.stack([s[1] for s in slots])).to(self.device),
            "nums": torch.from_numpy(np.concatenate([s[2] for s in slots])),
        }

    def _iter_batches(self, batches, start):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        b = start
        while b < len(batches):
            feed = _Feed(self, batches, b)
            pipe = it = failure = None
            try:
                pipe = self._pipeline(feed)
                # The plan pads every batch to full size, so the policy never has to act.
                it = DALIGenericIterator(
                    pipe, ["images", "ids", "nums"], auto_reset=False, last_batch_policy=LastBatchPolicy.FILL
                )
                for out in it:
                    out = out[0]
                    self._record(feed.events.pop(b, []))
                    batch = {"images": out["images"].to(self.device, self.dtype), "ids": out["ids"],
                             "nums": out["nums"][:, 0]}
                    b += 1
                    yield batch
            except RuntimeError as err:
                if feed.error is not None:
                    raise feed.error from err
                failure = err
            finally:
                feed.close()
                del it, pipe
            if failure is None:
                continue
            if self._find_bad(batches, b, max(feed.served, b)):
                log.debug("DALI failed near batch %d (%s); rebuilding without the bad samples", b, failure)
                continue
            yield self._pillow_batch(batches, b, failure)
            b += 1
