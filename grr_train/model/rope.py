"""Rotary position embedding (Su et al.): angles for 1D sequences and 2D axial patch grids.

Rotation acts on interleaved pairs (x[2i], x[2i+1]), so 1D and 2D share `apply_rope`: 2D gives
the first half of the pairs row angles and the second half column angles, so a query-key score
depends only on the row offset and the column offset. There are no parameters and no buffers:
angles are computed from positions on the fly, which also lets a KV cache continue at any offset.
"""

from __future__ import annotations

import torch


def _pair_angles(positions: torch.Tensor, num_pairs: int, theta: float) -> torch.Tensor:
    # (T,) -> (T, num_pairs); frequencies theta^(-2i/(2 * num_pairs)) as in RoFormer.
    inv_freq = theta ** (-torch.arange(num_pairs, dtype=torch.float32, device=positions.device) / num_pairs)
    return positions.float()[:, None] * inv_freq[None, :]


def rope_1d(
    positions: torch.Tensor, head_dim: int, theta: float = 10_000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (T, head_dim / 2), for integer positions (T,)."""
    angles = _pair_angles(positions, head_dim // 2, theta)
    return angles.cos(), angles.sin()


def rope_2d(
    grid_h: int, grid_w: int, head_dim: int, theta: float = 10_000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (grid_h * grid_w, head_dim / 2), for a row-major patch grid (axial RoPE)."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    quarter = head_dim // 4
    angles = torch.cat([_pair_angles(rows, quarter, theta), _pair_angles(cols, quarter, theta)], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by per-position angles cos/sin (T, head_dim / 2)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
