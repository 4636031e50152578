"""The timer of the per-kernel benchmarks (gemm_shapes.py, sdpa_sites.py): ms per call of a function."""

from __future__ import annotations

import time

import torch


def ms_per_call(fn, dev: torch.device, reps: int) -> float:
    """ms per call of fn(), after two untimed calls; CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(2):
        fn()
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1000 / reps
