"""Multi-head attention through `scaled_dot_product_attention`, for self- and cross-attention.

Parameters match nn.MultiheadAttention (4 * D * D + 4 * D: q, k, v and out projections with
biases), which the paper's counts assume for every attention layer (docs/DESIGN.md, "Parameter counts"). Self-attention
projects q, k and v with one matmul (`qkv`, rows q then k then v) and rotates q and k together;
cross-attention keeps `q` apart from `kv`, whose keys and values a decoder computes once per image.
Masks are additive, in the attention's compute dtype (`attention_dtype`), built once per forward by
the caller: a boolean mask would be converted (and, under autocast, cast) again in every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grr_train.model.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (T, head_dim), see rope.py


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in for activations like x: autocast's where it is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, -inf elsewhere, in `dtype` (SDPA adds it to the scores)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            # Initialised like separate q and kv layers: one normal draw in the same row order.
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor, num: int) -> torch.Tensor:
        # (B, T, num * D) -> (num, B, H, T, hd), a view
        b, t, _ = x.shape
        return x.view(b, t, num, self.heads, -1).permute(2, 0, 3, 1, 4)

    def self_qkv(
        self, x: torch.Tensor, rope: Rope | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (B, H, T, hd) of x (B, T, D); q and k rotated when `rope` is given.

        q and k are rotated while still laid out (B, T, H, hd), before the head transpose: flash and
        cuDNN attention write their output in q's layout, so a q stored (B, T, H, hd) makes the
        output's (B, T, D) reshape in `attend` a view; rotated after the transpose, q was stored
        (B, H, T, hd) and that reshape copied every output (and its gradient) once more.
        """
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, -1)  # (B, T, 3, H, hd)
        if rope is None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            return q, k, v
        cos, sin = (table[:, None, None, :] for table in rope)  # (T, 1, 1, hd): over q and k, all heads
        q, k = apply_rope(qkv[:, :, :2], cos, sin).permute(2, 0, 3, 1, 4)  # both rotated in one pass
        return q, k, qkv[:, :, 2].transpose(1, 2)

    def cross_q(self, x: torch.Tensor) -> torch.Tensor:
        """Queries (B, H, T, hd) of x (B, T, D) for cross-attention."""
        return self._heads(self.q(x), 1)[0]

    def cross_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, hd) of the context (B, S, D) for cross-attention (never rotated)."""
        return self.split_kv(self.kv(context))

    def split_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The `kv` projection's output (B, S, 2 * D) as keys and values (B, H, S, hd), views."""
        k, v = self._heads(kv, 2)
        return k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q (B, H, T, hd) attends to k, v (B, H, S, hd) -> (B, T, D); an additive mask (B or 1, 1, T, S)."""
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        b, h, t, hd = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * hd))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: Rope | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention over x, or (a cross module) attention from x to `context`."""
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context")
            return self.attend(self.cross_q(x), *self.cross_kv(context), mask)
        if context is not None:
            raise ValueError("this is a self-attention module; it takes no context")
        return self.attend(*self.self_qkv(x, rope), mask)

