"""Rotary position embedding (Su et al.): angles for 1D sequences and 2D axial patch grids.

Rotation acts on interleaved pairs (x[2i], x[2i+1]), so 1D and 2D share `apply_rope`: 2D gives
the first half of the pairs row angles and the second half column angles, so a query-key score
depends only on the row offset and the column offset. There are no parameters and no buffers.

Tables come expanded to the head size, (T, head_dim): `cos` repeats each pair's cosine twice and
`sin` holds (-sin, +sin) per pair, so a rotation is `x * cos + swap_pairs(x) * sin`: four kernels in
the activations' own dtype, where rotating pairs in float32 cost ~23 per call (issue 9's profile).
In float32 this is the same arithmetic as the textbook form, bit for bit. `rope_tables` caches
them per shape, device and dtype, so a training step computes them once per decoder or ViT shape.
`rope_tables_at` does the same for explicit 1D positions (a caption trimmed of its padding keeps
0..L-1 and CLS at 63: `CoCa.forward(trim_padding=True)`).
"""

from __future__ import annotations

import functools

import torch


def _pair_angles(positions: torch.Tensor, num_pairs: int, theta: float) -> torch.Tensor:
    # (T,) -> (T, num_pairs); frequencies theta^(-2i/(2 * num_pairs)) as in RoFormer.
    inv_freq = theta ** (-torch.arange(num_pairs, dtype=torch.float32, device=positions.device) / num_pairs)
    return positions.float()[:, None] * inv_freq[None, :]


def _expand(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (T, P) angles -> cos (T, 2P) as (c0, c0, c1, c1, ..) and sin (T, 2P) as (-s0, s0, -s1, s1, ..)
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def rope_1d(
    positions: torch.Tensor, head_dim: int, theta: float = 10_000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (T, head_dim), for integer positions (T,)."""
    return _expand(_pair_angles(positions, head_dim // 2, theta))


def rope_2d(
    grid_h: int, grid_w: int, head_dim: int, theta: float = 10_000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (grid_h * grid_w, head_dim), for a row-major patch grid (axial RoPE)."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    quarter = head_dim // 4
    angles = torch.cat([_pair_angles(rows, quarter, theta), _pair_angles(cols, quarter, theta)], dim=-1)
    return _expand(angles)


@functools.lru_cache(maxsize=256)
def _cached(kind: str, start: int, length: int, head_dim: int, theta: float, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "1d":
        cos, sin = rope_1d(torch.arange(start, start + length, device=device), head_dim, theta)
    else:
        side = int(round(length**0.5))
        cos, sin = rope_2d(side, side, head_dim, theta, device=device)
    return cos.to(dtype), sin.to(dtype)


def rope_tables(kind: str, start: int, length: int, head_dim: int, theta: float, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for positions start..start+length-1 ("1d") or a square grid of `length` patches ("2d").

    Cached outside torch.compile; inside a compiled graph they are computed (and constant-folded).
    """
    if kind not in ("1d", "2d"):
        raise ValueError(f"unknown RoPE kind {kind!r}; expected '1d' or '2d'")
    if torch.compiler.is_compiling():
        return _cached.__wrapped__(kind, start, length, head_dim, theta, device, dtype)
    return _cached(kind, start, length, head_dim, theta, torch.device(device), dtype)


@functools.lru_cache(maxsize=256)
def _cached_at(positions: tuple[int, ...], head_dim: int, theta: float, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope_1d(torch.tensor(positions, device=device), head_dim, theta)
    return cos.to(dtype), sin.to(dtype)


def rope_tables_at(positions: tuple[int, ...], head_dim: int, theta: float, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """1D tables (T, head_dim) for explicit positions (T,), e.g. (0, 1, .., L-1, 63): the same values
    `rope_tables("1d", ...)` gives at those positions. Cached per positions, device and dtype."""
    if torch.compiler.is_compiling():
        return _cached_at.__wrapped__(tuple(positions), head_dim, theta, device, dtype)
    return _cached_at(tuple(positions), head_dim, theta, torch.device(device), dtype)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(.., 2P) -> (.., 2P) with each pair's two elements exchanged: (x1, x0, x3, x2, ..)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x by per-position tables cos/sin, in x's dtype: x (..., T, head_dim) with tables
    (T, head_dim), or any layout the tables broadcast to, e.g. x (B, T, 2, H, hd) with (T, 1, 1, hd)."""
    return x * cos.to(x.dtype) + swap_pairs(x) * sin.to(x.dtype)


def clear_rope_cache() -> None:
    """Forget the cached tables (FLOP counting builds fake ones that a real model must not read)."""
    _cached.cache_clear()
    _cached_at.cache_clear()
