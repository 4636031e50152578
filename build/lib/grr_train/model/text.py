"""The text decoders (paper 3.3): a causal unimodal decoder and a multimodal decoder that also
cross-attends to the generative pooler's image tokens. Both use RMSNorm, RoPE and GEGLU 4x.

PAD keys are masked (docs/DESIGN.md, "Contracts"; the caller says which keys are valid, see `CoCa._key_valid`), so
what stands at a PAD position never changes an output the losses read. Every query may always see its own position, so no attention row is empty (no NaN)
even for a PAD query; outputs at PAD positions are never read. With a layer cache the decoder
processes only the new tokens and RoPE positions continue from the cache length. Without a cache
the tokens may be a subset of the positions (`positions`: a caption trimmed of padding no row uses,
see `CoCa._kept_positions`); RoPE then rotates each by its true position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grr_train.model.attention import Attention, Rope, additive_mask, attention_dtype
from grr_train.model.ffn import GEGLU
from grr_train.model.norms import RMSNorm
from grr_train.model.rope import rope_tables, rope_tables_at


def decoder_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(B, 1, T, S) True where the last T of S positions may attend: causal, PAD keys out, self always in.

    key_valid (B, S) is False at PAD positions; the queries are positions S-T .. S-1.
    """
    num_keys = key_valid.shape[1]
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=key_valid.device)[:, None]
    k_pos = torch.arange(num_keys, device=key_valid.device)[None, :]
    allowed = (k_pos <= q_pos) & key_valid[:, None, :]  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)
    return allowed[:, None]


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.norm_cross = RMSNorm(dim) if cross else None
        self.cross_attn = Attention(dim, heads, dropout, cross=True) if cross else None
        self.norm2 = RMSNorm(dim)
        self.ffn = GEGLU(dim, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        q, k, v = self.self_attn.self_qkv(self.norm1(x), rope)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        x = x + self.drop(self.self_attn.attend(q, k, v, mask))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn.attend(self.cross_attn.cross_q(self.norm_cross(x)), *context_kv))
        return x + self.drop(self.ffn(self.norm2(x)))


class TextDecoder(nn.Module):
    """A stack of decoder blocks; `cross=True` makes it the multimodal decoder."""

    def __init__(
        self, dim: int, heads: int, depth: int, hidden: int, dropout: float, cross: bool, rope_theta: float
    ) -> None:
        super().__init__()
        self.cross = cross
        self.rope_theta = rope_theta
        self.head_dim = dim // heads
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, hidden, dropout, cross) for _ in range(depth))
        # Set at run time (grr_train.runtime.parallel.compile_regions): every block's key/value projection of
        # the image tokens as one GEMM over their concatenated weights (the same parameters). Not
        # under FSDP2, which gathers each block's projection weights only when that module is called.
        self.merge_context_kv = False

    def context_keys_values(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys and values of the image tokens (B, M, D), per block (computed once per image)."""
        if not self.merge_context_kv:
            return [block.cross_attn.cross_kv(context) for block in self.blocks]
        projections = [block.cross_attn.kv for block in self.blocks]
        kv = F.linear(context, torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections]))
        return [block.cross_attn.split_kv(part) for block, part in zip(self.blocks, kv.chunk(len(self.blocks), -1),
                                                                         strict=True)]

    def forward(
        self,
        x: torch.Tensor,
        key_valid: torch.Tensor,
        context: torch.Tensor | None = None,
        context_kv: list | None = None,
        caches: list[dict] | None = None,
        positions: tuple[int, ...] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). key_valid (B, S) covers cached and new positions (S = cache + T).

        The multimodal decoder takes `context` (B, M, D) or its precomputed `context_kv`.
        `positions` (T increasing ints, no cache): the true positions of x's tokens, for RoPE; the
        causal mask is over x's order, which is theirs. None: 0..T-1 after the cache.
        `mask`: the additive mask (B, 1, T, S) of `decoder_mask(key_valid, T)`, when the caller built it.
        """
        num_new = x.shape[1]
        offset = key_valid.shape[1] - num_new
        dtype = attention_dtype(x)
        if positions is None:
            rope = rope_tables("1d", offset, num_new, self.head_dim, self.rope_theta, x.device, dtype)
        elif caches is not None or len(positions) != num_new:
            raise ValueError(f"{len(positions)} positions for {num_new} tokens (cache: {caches is not None}); "
                             "positions need one per token and no cache")
        else:
            rope = rope_tables_at(positions, self.head_dim, self.rope_theta, x.device, dtype)
        if mask is None:
            mask = additive_mask(decoder_mask(key_valid, num_new), dtype)
        if self.cross and context_kv is None:
            if context is None:
                raise ValueError("the multimodal decoder needs the image tokens as context")
            context_kv = self.context_keys_values(context)
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                rope,
                mask,
                context_kv[i] if self.cross else None,
                caches[i] if caches is not None else None,
            )
        return x
