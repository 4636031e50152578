"""Which device a command runs on: the one place that turns a `--device` value into a device.

"auto" is a CUDA GPU when there is one, else the CPU. A device this machine does not have is
refused before any work starts, with what to pass instead (torch's own error comes later, from
deep inside the first tensor moved there, as a long traceback).
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> str:
    """"cpu", "cuda" or "cuda:N" for `name` (cpu, cuda, cuda:N or auto); ValueError when this
    machine cannot run it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not one of cpu, cuda, cuda:N, auto") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"device {name!r}: no CUDA GPU is usable here (torch {torch.__version__}, {build}); "
                         "use --device cpu, or --device auto to take a GPU only where there is one")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return name


def is_out_of_memory(err: BaseException) -> bool:
    """A GPU or CPU allocation that failed (torch raises these from deep inside a step)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))


def out_of_memory_advice(err: BaseException, preset: str, micro_batch: int, remedy: str) -> str:
    """One line for a step that did not fit: what ran out, and what to change (`remedy`, in the
    words of the command that ran it)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"out of memory running {preset} at micro-batch {micro_batch} ({first[:160]}); {remedy}; "
            f"`python benchmarks/step_memory.py {preset} --batch-sizes {micro_batch}` estimates a step's GPU memory")
