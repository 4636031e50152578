"""The baseline ViT's fixed absolute position encoding (Vaswani et al. sinusoids).

A fixed function, not a parameter: a learnable table would add 256 x 768 parameters to the
baseline and the paper's 685,656 difference would no longer come out (docs/DESIGN.md, "Parameter counts").
"""

from __future__ import annotations

import functools
import math

import torch


def sincos_1d(num_positions: int, dim: int, device=None) -> torch.Tensor:
    """(num_positions, dim): sin on even channels, cos on odd, over the patch sequence."""
    positions = torch.arange(num_positions, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10_000.0) / dim)
    )
    table = torch.zeros(num_positions, dim, device=device)
    table[:, 0::2] = torch.sin(positions * inv_freq)
    table[:, 1::2] = torch.cos(positions * inv_freq)
    return table


@functools.lru_cache(maxsize=16)
def _cached_sincos(num_positions: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return sincos_1d(num_positions, dim, device=device).to(dtype)


def sincos_table(num_positions: int, dim: int, device, dtype: torch.dtype) -> torch.Tensor:
    """`sincos_1d` in `dtype`, computed once per shape, device and dtype (outside torch.compile)."""
    if torch.compiler.is_compiling():
        return sincos_1d(num_positions, dim, device=device).to(dtype)
    return _cached_sincos(num_positions, dim, torch.device(device), dtype)
