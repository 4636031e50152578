"""The CPU loader: Pillow decoding in torch DataLoader workers; serves CPU runs and GPUs without DALI.

Each worker makes whole batches (round-robin over the rank's plan, `plan.worker_batches`), so
the DataLoader hands them back in plan order whatever the number of workers. A worker reads
members by offset (`ShardSet.read`), decodes with Pillow (pillow-simd when installed: same
API), resizes bilinearly to 288x288 and returns uint8 (B, 288, 288, 3): four times less to
pin and copy than float. The main process copies it to the target device (pinned memory and
`non_blocking` for CUDA) and normalises there.

JPEG draft mode (`draft=True`): when a source is at least twice 288 on both sides, libjpeg
decodes it at 1/2, 1/4 or 1/8 scale before the bilinear resize. It is much cheaper but not
identical to a full decode; sets made by `grr data fetch` have a shorter side of 288, where
draft never applies.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from grr_data.infra.procs import loader_worker_init
from grr_data.infra.store import StoreError
from grr_data.loader.base import IMAGE_SIZE, LoaderBase, fill_batch, normalize, plan_after
from grr_data.loader.plan import worker_batches
from grr_data.loader.reader import BatchReader
from grr_data.loader.source import SampleError

DEFAULT_PREFETCH_PER_WORKER = 4


def decode_image(jpg: bytes, draft: bool = True) -> np.ndarray:
    """JPEG bytes -> (288, 288, 3) uint8, bilinear, aspect not kept; raises SampleError."""
    try:
        img = Image.open(io.BytesIO(jpg))
        if draft and img.format == "JPEG" and min(img.size) >= 2 * IMAGE_SIZE:
            img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        return resize_image(img)
    except Exception as err:  # Pillow raises many types for damaged files
        raise SampleError("decode_error", f"{type(err).__name__}: {err}") from err


def resize_image(img: Image.Image) -> np.ndarray:
    """A Pillow image -> (288, 288, 3) uint8: RGB, bilinear, aspect not kept."""
    return np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


def preprocess_image(image: bytes | str | os.PathLike | Image.Image,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One image file (its bytes or its path) or Pillow image -> (3, 288, 288) `dtype`, exactly as
    the loaders give it: full decode, RGB, bilinear resize to 288x288, ImageNet mean and std. For
    images from outside a sharded set (captioning); raises ValueError naming the file."""
    if isinstance(image, Image.Image):
        return normalize(torch.from_numpy(resize_image(image).copy())[None], dtype)[0]
    name = "image bytes"
    if not isinstance(image, bytes | bytearray | memoryview):
        name = str(image)
        try:
            image = Path(image).read_bytes()
        except OSError as err:
            raise ValueError(f"{name}: cannot read this file ({err})") from err
    try:
        # No draft decoding: it is an approximation the loader takes only for speed.
        pixels = decode_image(bytes(image), draft=False)  # (288, 288, 3) uint8
    except SampleError as err:
        raise ValueError(f"{name}: not an image Pillow can decode ({err})") from err
    return normalize(torch.from_numpy(pixels.copy())[None], dtype)[0]


class BatchStream(IterableDataset):
    """Yields this worker's share of `batches[start:]` as dicts of tensors plus skip events.

    A set in an object store is read `shards.read_ahead` batches ahead of the one being decoded, on
    a thread of the worker (reader.BatchReader: a batch's samples in one set of concurrent requests),
    so the store's latency overlaps the decoding; a store that stops answering ends the stream with
    a `store_error` item whose StoreError the loader raises in the main process (as it is, not
    wrapped in a worker's traceback)."""

    def __init__(self, shards, batches: np.ndarray, start: int, draft: bool):
        self.shards, self.batches, self.start, self.draft = shards, batches, start, draft

    def _load(self, g: int):
        jpg, ids = self.shards.read(int(g))
        return decode_image(jpg, self.draft), ids, int(g)

    def _decode(self, g: int, read):
        if isinstance(read, SampleError):
            raise read
        return decode_image(read[0], self.draft), read[1], int(g)

    def _fallback(self, after: int):
        # Every sample of the batch failed: take the first usable sample after it in the plan.
        for g in plan_after(self.batches, after):
            try:
                return self._load(g)
            except SampleError:
                continue
        raise RuntimeError(f"{self.shards.root}: no sample of this rank's plan can be decoded")

    def make_batch(self, b: int, reads: list | None = None) -> dict:
        """Batch b; `reads`: its samples as `shards.read_many` gave them, when read ahead."""
        slots, skips = [], []
        reads = self.shards.read_many(self.batches[b]) if reads is None else reads
        for g, read in zip(self.batches[b], reads, strict=True):
            try:
                slots.append(self._decode(g, read))
            except SampleError as err:
                slots.append(None)
                skips.append((err.reason, int(g), str(err)))
        filled = fill_batch(slots, lambda: self._fallback(b))
        return {
            "images": torch.from_numpy(np.stack([s[0] for s in filled])),  # (B, 288, 288, 3) uint8
            "ids": torch.from_numpy(np.stack([s[1] for s in filled])),
            "nums": torch.tensor([s[2] for s in filled], dtype=torch.int64),
            "skips": skips,
        }

    def __iter__(self):
        info = get_worker_info()
        wid, num = (info.id, info.num_workers) if info else (0, 1)
        mine = [self.start + i for i in worker_batches(len(self.batches) - self.start, wid, num)]
        reader = None
        if self.shards.read_ahead and mine:
            reader = BatchReader(lambda k: self.shards.read_many(self.batches[mine[k]]), 0, len(mine),
                                 self.shards.read_ahead, name="grr-store-reader")
        try:
            for k, b in enumerate(mine):
                yield self.make_batch(b, reader.get(k) if reader is not None else None)
        except StoreError as err:
            yield {"store_error": err}
        finally:
            if reader is not None:
                reader.close()


class CpuLoader(LoaderBase):
    name = "cpu"

    def __init__(
        self,
        shards,
        plan,
        device="cpu",
        dtype=torch.float32,
        with_keys=False,
        num_workers: int = 2,
        draft: bool = True,
        prefetch: int | None = None,
    ):
        super().__init__(shards, plan, device, dtype, with_keys)
        if prefetch is not None and prefetch < 1:
            raise ValueError(f"prefetch must be at least 1 batch, got {prefetch}")
        self.num_workers, self.draft, self.prefetch = num_workers, draft, prefetch

    def _iter_batches(self, batches, start):
        stream = BatchStream(self.shards, batches, start, self.draft)
        cuda = self.device.type == "cuda"
        workers = min(self.num_workers, len(batches) - start)
        # DataLoader's prefetch_factor counts per worker; `prefetch` counts batches in all.
        per_worker = DEFAULT_PREFETCH_PER_WORKER if self.prefetch is None else -(-self.prefetch // max(workers, 1))
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=cuda,
            prefetch_factor=per_worker if workers > 0 else None,
            # a stop signal sent to the process group is the main process's: it finishes the
            # step and saves; workers killed by it would end the run without a checkpoint
            worker_init_fn=loader_worker_init,
        )
        for item in loader:
            if "store_error" in item:
                raise item["store_error"]
            for reason, g, message in item.pop("skips"):
                self._skips.add(reason, lambda g=g: self.shards.describe(g), message)
            images = item["images"].to(self.device, non_blocking=cuda)
            item["images"] = normalize(images, self.dtype)
            item["ids"] = item["ids"].to(self.device, non_blocking=cuda)
            yield item
