"""The loaders: `make_loader` gives a DALI or a CPU loader with one output contract (CONTRACTS.md).

Both follow the same per-rank plan (`plan.py`: sharding, padding, shuffling, resume) and the
same output (`base.py`); `dali.py` decodes on the GPU, `cpu.py` with Pillow in workers.
`preprocess_image` turns one image file into exactly what a loader would give for it.
"""

from __future__ import annotations

import logging
import os

import torch

from grr_data.format.manifest import Manifest
from grr_data.loader.base import IMAGE_SIZE, LoaderBase
from grr_data.loader.cpu import preprocess_image
from grr_data.loader.plan import Plan
from grr_data.loader.source import ShardSet

__all__ = ["IMAGE_SIZE", "LoaderBase", "Plan", "ShardSet", "dali_problem", "make_loader", "pick_kind",
           "preprocess_image"]
log = logging.getLogger("grr.loader")


def pick_kind(kind: str, device: str) -> str:
    """Resolve "auto": DALI when the target is a CUDA device and DALI imports, else the CPU loader."""
    from grr_data.loader.dali import dali_available

    if kind == "auto":
        gpu = torch.device(device).type == "cuda" and torch.cuda.is_available()
        kind = "dali" if gpu and dali_available() else "cpu"
        why = "GPU target and DALI present" if kind == "dali" else "no CUDA target or no DALI"
        log.info("loader: picked %s (%s)", kind, why)
    elif kind == "dali" and (problem := dali_problem(need_gpu=False)):
        raise ValueError(problem)
    elif kind not in ("cpu", "dali"):
        raise ValueError(f"loader kind must be auto, dali or cpu, got {kind!r}")
    return kind


def dali_problem(need_gpu: bool = True) -> str | None:
    """Why the DALI loader cannot run here, in one line with what to do; None when it can.

    DALI is a wheel per CUDA major version of torch (the extras gpu-cu12 and gpu-cu13, what
    scripts/choose_dali.py picks); `need_gpu`: a training run's DALI loader decodes on the GPU (the
    CPU path is for tests)."""
    from grr_data.loader.dali import dali_available

    gpu = torch.cuda.is_available()
    if need_gpu and not gpu:
        return "the DALI loader needs a CUDA GPU and none is usable here: use --loader cpu (or auto)"
    if dali_available():
        return None
    cuda = torch.version.cuda
    major = cuda.split(".")[0] if cuda else None
    if major in ("12", "13"):
        return (f"the DALI loader needs NVIDIA DALI, which is not installed: pip install 'grr-coca[gpu-cu{major}]' "
                f"(torch is built for CUDA {cuda}), or use --loader cpu")
    if cuda is None:
        return ("the DALI loader needs NVIDIA DALI and a CUDA build of torch (this torch is CPU-only): "
                "use --loader cpu")
    return (f"the DALI loader needs NVIDIA DALI, whose extras are for CUDA 12 (gpu-cu12) and 13 (gpu-cu13), but "
            f"torch is built for CUDA {cuda}: use --loader cpu, or a torch built for CUDA 12 or 13")


def make_loader(
    data: Manifest | str | os.PathLike,
    split: str = "train",
    batch_size: int = 8,
    kind: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_keys: bool = False,
    prefetch: int | None = None,
    batch_multiple: int = 1,
    **options,
) -> LoaderBase:
    """A loader over one split of `data` (a set's Manifest, or its folder); `options` go to the chosen loader (cpu: draft; dali: num_threads
    (default max(num_workers, 1)), hw_decoder_load).

    `prefetch`: how many batches the loader prepares ahead of the consumer (None: the loader's
    default, dali 2, cpu 4 per worker). A consumer that takes k batches before it uses any (a
    trainer accumulating k micro-batches) should ask for k + 1, or the GPU waits for the rest.
    `batch_multiple`: the epoch's batches per rank are padded to a multiple of it (the trainer's
    accumulation, so that an epoch is a whole number of optimizer steps; see plan.py).
    """
    kind = pick_kind(kind, device)
    shards = ShardSet(data, split, keep_keys=with_keys)
    plan = Plan(shards.num_samples, batch_size, world_size, rank, seed, shuffle, batch_multiple)
    if kind == "dali":
        from grr_data.loader.dali import DaliLoader

        options.setdefault("num_threads", max(num_workers, 1))
        return DaliLoader(shards, plan, device, dtype, with_keys, prefetch=prefetch, **options)
    from grr_data.loader.cpu import CpuLoader

    return CpuLoader(shards, plan, device, dtype, with_keys, num_workers=num_workers, prefetch=prefetch, **options)
