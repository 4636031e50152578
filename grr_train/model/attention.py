"""Multi-head attention through `scaled_dot_product_attention`, for self- and cross-attention.

Parameters match nn.MultiheadAttention (4 * D * D + 4 * D: q, k, v and out projections with
biases), which the paper's counts assume for every attention layer (DESIGN.md). Keys/values
and queries are computed separately so decoders can cache keys and values between steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grr_train.model.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (T, head_dim / 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, hd)

    def keys_values(
        self, source: torch.Tensor, rope: Rope | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, hd) of `source` (B, S, D); keys rotated when `rope` is given."""
        k, v = self.kv(source).chunk(2, dim=-1)
        k, v = self._split(k), self._split(v)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v

    def attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: Rope | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries from x (B, T, D) attend to k, v; mask (B or 1, 1, T, S) is True where allowed."""
        q = self._split(self.q(x))
        if rope is not None:
            q = apply_rope(q, *rope)
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
        """Self-attention over x, or cross-attention to `context` (never rotated) when given."""
        if context is None:
            k, v = self.keys_values(x, rope)
            return self.attend(x, k, v, rope, mask)
        k, v = self.keys_values(context)
        return self.attend(x, k, v, None, mask)
