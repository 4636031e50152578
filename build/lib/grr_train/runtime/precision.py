"""Mixed precision in one place: which autocast dtype a `precision` setting means, and the context.

`precision` is "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32". The trainer,
validation, evaluation and `grr bench train` all use these two functions, so a run is
measured the way it was trained.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """torch.bfloat16 for "bf16" (and "auto" on a GPU), None (plain fp32) otherwise."""
    device_type = torch.device(device).type
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(dtype: torch.dtype | None, device: torch.device | str) -> AbstractContextManager:
    """Autocast to `dtype` on `device`'s type; a disabled autocast (fp32) when `dtype` is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)
