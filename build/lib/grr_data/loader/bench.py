"""`grr bench loader`: a loader's throughput (images/s) and CPU use (cores) on a sharded set."""

from __future__ import annotations

import os
import resource
import time

import torch

from grr_data.loader import make_loader


def _cpu_seconds() -> float:
    # Children count once reaped: the loader's workers are joined before the last reading.
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def bench_loader(
    data_dir: str | os.PathLike,
    kind: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 2,
    num_batches: int = 50,
    split: str = "train",
    device: str | None = None,
    **options,
) -> dict:
    """Read `num_batches` batches (over epochs if needed); returns the figures as a dict.

    `images_per_s` counts from the first batch on (start-up excluded); `cores` is process CPU
    time (workers included) over the whole wall time, start-up included; `cpu_ms_per_image` is the
    same CPU time per image read, which stays meaningful on a machine shared with other work.
    """
    if device is None:
        device = "cuda" if kind != "cpu" and torch.cuda.is_available() else "cpu"
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    loader = make_loader(data_dir, split, batch_size, kind, num_workers=num_workers, device=device, **options)
    done, first_at = 0, None
    while done < num_batches:
        epoch = iter(loader)
        for _batch in epoch:
            if first_at is None:
                first_at = time.perf_counter()
            done += 1
            if done >= num_batches:
                break
        epoch.close()  # shuts the epoch's workers down now, so their CPU time is counted
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    del _batch
    wall = time.perf_counter() - wall0
    steady = time.perf_counter() - first_at
    return {
        "loader": loader.name,
        "device": device,
        "batch_size": batch_size,
        "workers": num_workers,
        "batches": done,
        "startup_s": first_at - wall0,
        "images_per_s": (done - 1) * batch_size / steady if done > 1 else float("nan"),
        "cores": (_cpu_seconds() - cpu0) / wall,
        "cpu_ms_per_image": (_cpu_seconds() - cpu0) * 1000 / (done * batch_size),
        "skipped": loader.skipped,
        "options": options,
    }
