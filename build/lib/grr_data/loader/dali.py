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
(fine on local disks or page cache, slower on network filesystems). A set in an object store
(`s3://`, `gs://`) is read the same way, not through DALI's own `s3://` reader: a batch's samples
by concurrent ranged GETs (`ShardSet.read_many`) on the reader thread, `prefetch` batches ahead. The reads run on a
background thread (`reader.py`), in plan order; the callback DALI calls on the training thread
only takes the next batch's bytes. DALI works `prefetch` batches ahead: a trainer that takes
several micro-batches before launching GPU work asks for more than it takes (make_loader).

One pipeline per loader: building one with the nvJPEG decoder costs seconds on a GPU, so an
epoch or a resume point only swaps what the callback reads (a `_Feed`: one reader thread over
batches `start..` of one epoch) and resets DALI's iterator. At an epoch's end the callback
raises StopIteration however far ahead DALI asks; an epoch abandoned part way (its iterator
closed or collected) stops and joins its reader at once, and the next epoch first takes what
DALI had prefetched of it (at most `prefetch` batches) and drops it. The pipeline is rebuilt
only after DALI fails; `close()` (or collecting the loader) releases it.

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
remembers them, and rebuilds the pipeline to go on at the failing batch with those samples
replaced (the rule in `base.py`). If Pillow finds no culprit (DALI rejects a batch Pillow reads), that batch
is decoded with Pillow (as `preprocess_image` does), counted in `fallback_batches` and logged,
and the pipeline is rebuilt at the next batch.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from grr_data.loader.base import IMAGE_SIZE, MEAN, STD, LoaderBase, fill_batch, normalize, plan_after
from grr_data.loader.cpu import decode_image
from grr_data.loader.reader import BatchReader
from grr_data.loader.source import SampleError

log = logging.getLogger("grr.loader")
# Pipelines a forked child inherited and must never shut down (see DaliLoader._drop_pipeline).
_INHERITED: list = []
DEFAULT_PREFETCH = 2


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _Feed:
    """Batches `start..` of one epoch's plan, read ahead by a BatchReader, in the order DALI asks
    for them; remembers the skip events of each batch and the last batch handed to DALI."""

    def __init__(self, make, start: int, stop: int, depth: int):
        self.next, self.served, self.error = start, start - 1, None
        self.events: dict[int, list] = {}
        self.reader = BatchReader(make, start, stop, depth, name="grr-dali-reader")

    def take(self):
        b = self.next
        try:
            payload, events = self.reader.get(b)
        except StopIteration:
            raise
        except BaseException as err:
            self.error = err  # not DALI's failure: the loader raises it as it is
            raise
        self.events[b], self.served, self.next = events, b, b + 1
        return payload

    def close(self) -> None:
        self.reader.close()


class _Source:
    """The external_source callback of the loader's one pipeline: the next batch of the feed in
    place, StopIteration when there is none (epoch end, feed closed, between epochs). The loader
    swaps feeds between epochs and resume points, so the pipeline is never rebuilt for them.
    DALI calls it on the thread that runs the iterator, a few batches ahead of what it hands
    out; the batch number is counted here, not taken from DALI's `info.iteration`, because a feed
    may start mid-epoch (resume, rebuild after a failure) while DALI counts from its own reset."""

    def __init__(self):
        self.feed: _Feed | None = None

    def __call__(self, _info):
        feed = self.feed
        if feed is None:
            raise StopIteration
        return feed.take()


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
        # One pipeline for the loader's life (building one with nvJPEG costs seconds on a GPU),
        # rebuilt only after DALI fails. `_state`: "new" (never run), "ended" (ran to StopIteration:
        # reset before the next feed), "open" (a feed was abandoned part way: drain first).
        self._source = _Source()
        self._pipe = self._it = None
        self._state = "new"
        self._owner = os.getpid()

    def _read_slot(self, g: int, events: list, read=None):
        """Sample g as external_source takes it, or None (and its skip event) when it is unusable;
        `read`: what `shards.read_many` gave for it, when read with its batch."""
        if g in self._bad:
            events.append((g, *self._bad[g]))
            return None
        try:
            if isinstance(read, SampleError):
                raise read
            jpg, ids = self.shards.read(g) if read is None else read
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
        # the batch's samples read together (a set in a store: one set of concurrent requests)
        todo = [int(g) for g in batches[b] if int(g) not in self._bad]
        reads = dict(zip(todo, self.shards.read_many(todo), strict=True))
        slots = fill_batch(
            [self._read_slot(int(g), events, reads.get(int(g))) for g in batches[b]],
            lambda: self._fallback(batches, b),
        )
        return tuple([s[k] for s in slots] for k in range(3)), events

    def _device_id(self) -> int:
        # "cuda" without an index means the current device (what DDP ranks set), not GPU 0.
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _pipeline(self, source):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        # Plain values only: the graph function must not hold the loader (no cycle through DALI).
        dali_dtype, hw_load = self.dali_dtype, self.hw_decoder_load
        decoder = {"device": "mixed", "hw_decoder_load": hw_load} if gpu else {"device": "cpu"}

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
            images = fn.decoders.image(jpegs, output_type=types.RGB, jpeg_fancy_upsampling=True, **decoder)
            images = fn.resize(
                images, size=[IMAGE_SIZE, IMAGE_SIZE], interp_type=types.INTERP_LINEAR, antialias=True
            )
            images = fn.crop_mirror_normalize(
                images,
                dtype=dali_dtype,
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
            "with Pillow instead (%d such batches so far)",
            b,
            self.epoch,
            err,
            self.fallback_batches,
        )
        pixels = torch.from_numpy(np.stack([s[0] for s in slots])).to(self.device)  # (B, 288, 288, 3) uint8
        return {
            "images": normalize(pixels, self.dtype),
            "ids": torch.from_numpy(np.stack([s[1] for s in slots])).to(self.device),
            "nums": torch.from_numpy(np.concatenate([s[2] for s in slots])),
        }

    def _open(self, batches: np.ndarray, b: int) -> _Feed:
        """Feed batches b.. of `batches` to the pipeline (built here the first time or after a
        failure) and make it ready to run them from the first."""
        self._close_feed()  # an earlier iteration left open: it is superseded (and raises if resumed)
        if self._state == "open":
            self._drain()
        feed = _Feed(lambda k: self._payload(batches, k), b, len(batches), self.prefetch)
        self._source.feed = feed
        try:
            if self._it is None:
                from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

                self._pipe = self._pipeline(self._source)
                # The plan pads every batch to full size, so the policy never has to act. No
                # first batch at construction: DALI asks the source only when iterated.
                self._it = DALIGenericIterator(
                    self._pipe,
                    ["images", "ids", "nums"],
                    auto_reset=False,
                    last_batch_policy=LastBatchPolicy.FILL,
                    prepare_first_batch=False,
                )
            elif self._state == "ended":
                self._it.reset()  # DALI starts reading the new feed here (its prefetch)
        except BaseException:
            self._close_feed()
            self._drop_pipeline()
            raise
        self._state = "open"
        return feed

    def _drain(self) -> None:
        """Take what DALI still holds of an abandoned feed (the source is closed, so at most its
        prefetch), leaving the pipeline at an epoch end; drop the pipeline if DALI fails on it."""
        try:
            while True:  # next(), not a for loop: DALI's __iter__ may reset the iterator itself
                next(self._it)
        except StopIteration:
            self._state = "ended"
        except Exception as err:  # noqa: BLE001 - the batches are discarded; a new pipeline is built
            log.debug("DALI failed while discarding an abandoned epoch's batches (%s); rebuilding", err)
            self._drop_pipeline()

    def _close_feed(self) -> None:
        feed, self._source.feed = self._source.feed, None
        if feed is not None:
            feed.close()

    def _drop_pipeline(self) -> None:
        if self._pipe is not None and os.getpid() != self._owner:
            # A forked process (a DataLoader or shard worker) collecting a loader it inherited: the
            # pipeline's threads live in the parent only, and shutting it down here waits for them
            # forever (seen as a hung `grr data check` worker). Keep it alive; the process exits.
            _INHERITED.append((self._it, self._pipe))
        self._it = self._pipe = None
        self._state = "new"

    def close(self) -> None:
        """Stop the reader thread and release the DALI pipeline (a later iteration builds a new
        one); safe to call more than once. Also runs when the loader is garbage collected."""
        self._close_feed()
        self._drop_pipeline()

    def __del__(self):
        if "_source" in self.__dict__:  # __init__ may have raised before making it
            self.close()

    def _iter_batches(self, batches, start):
        b = start
        while b < len(batches):
            feed = self._open(batches, b)
            failure = None
            try:
                while True:
                    if self._source.feed is not feed:
                        raise RuntimeError(
                            "this DALI loader was iterated again while an earlier iteration of it was "
                            "still open: finish or close the earlier one first (one pipeline serves one "
                            "iteration at a time)"
                        )
                    try:
                        out = next(self._it)[0]
                    except StopIteration:
                        break
                    self._record(feed.events.pop(b, []))
                    batch = {
                        "images": out["images"].to(self.device, self.dtype),
                        "ids": out["ids"],
                        "nums": out["nums"][:, 0],
                    }
                    b += 1
                    yield batch
                self._state = "ended"
            except Exception as err:
                if self._source.feed is feed:
                    # DALI's state after an error is unknown: the next feed gets a new pipeline.
                    self._drop_pipeline()
                # Taken off the feed: a feed holding its error's traceback is a cycle (the traceback's
                # frames hold the feed and DALI's iterator) that would keep the failed pipeline until
                # the cyclic collector runs, on whatever thread it runs on (a reader thread, too).
                error, feed.error = feed.error, None
                if error is not None:
                    try:
                        if err is error:
                            raise
                        raise error from err
                    finally:
                        del error  # nor may this frame keep it
                if not isinstance(err, RuntimeError) or self._source.feed is not feed:
                    raise
                failure = err
            finally:
                # Also on close (an abandoned epoch): the reader stops and is joined here, and the
                # pipeline keeps what it prefetched until the next feed drains it.
                if self._source.feed is feed:
                    self._close_feed()
                else:
                    feed.close()
            if failure is None:
                if b < len(batches):  # never expected: the feed ends only at the epoch's end
                    raise RuntimeError(f"DALI ended epoch {self.epoch} at batch {b} of {len(batches)}")
                continue
            if self._find_bad(batches, b, max(feed.served, b)):
                log.debug("DALI failed near batch %d (%s); rebuilding without the bad samples", b, failure)
                continue
            yield self._pillow_batch(batches, b, failure)
            b += 1
