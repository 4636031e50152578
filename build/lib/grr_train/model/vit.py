"""The image encoder: a pre-norm ViT whose norm, feed-forward and position encoding are swappable.

Baseline CoCa: LayerNorm, GELU MLP 4x, fixed sinusoidal absolute positions added once.
GRR-CoCa: RMSNorm, GEGLU 2.7x, RoPE applied to queries and keys in every block (paper 3.3).
"""

from __future__ import annotations

import torch
from torch import nn

from grr_train.model.attention import Attention, Rope, attention_dtype
from grr_train.model.config import ModelConfig
from grr_train.model.ffn import make_ffn
from grr_train.model.norms import make_norm
from grr_train.model.posembed import sincos_table
from grr_train.model.rope import rope_tables


class ViTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.vit_norm, cfg.width)
        self.attn = Attention(cfg.width, cfg.heads, cfg.dropout)
        self.norm2 = make_norm(cfg.vit_norm, cfg.width)
        self.ffn = make_ffn(cfg.vit_ffn, cfg.width, cfg.vit_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope=rope))
        return x + self.drop(self.ffn(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        # A pre-norm stack needs a final norm; a learnable one would either add 768 (RMSNorm) or
        # 1536 (LayerNorm) parameters and break the paper's 685,656 = 12 x per-block difference,
        # so it normalises without parameters (docs/DESIGN.md, "Parameter counts").
        self.norm = make_norm(cfg.vit_norm, cfg.width, affine=False)

    def _rope(self, x: torch.Tensor) -> Rope | None:
        cfg = self.cfg
        if cfg.vit_pos == "sincos":
            return None
        kind = "1d" if cfg.vit_pos == "rope1d" else "2d"
        return rope_tables(kind, 0, cfg.num_patches, cfg.head_dim, cfg.rope_theta, x.device, attention_dtype(x))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> the first block's input (B, N, D): patches, positions, dropout."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cfg.vit_pos == "sincos":
            x = x + sincos_table(x.shape[1], self.cfg.width, x.device, x.dtype)
        return self.drop(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> patch tokens (B, N, D), N = (S / patch)^2, normalised."""
        cfg = self.cfg
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images have shape {tuple(images.shape)}; this model takes (B, 3, {cfg.image_size}, "
                f"{cfg.image_size}): resize them as the loaders do"
            )
        x = self.embed(images)
        rope = self._rope(x)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)
