"""Normalisation layers: RMSNorm (weight only) and the norm factory the ViT and decoders use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): a weight and no bias, as the paper's counts need.

    Through `F.rms_norm`: one fused kernel each way on a GPU, accumulating in float32 whatever the
    input dtype (so bf16 activations do not lose the statistic), where the hand-written float32
    form cost ~22 operators per call. The weight is given in the input's dtype, which the fused
    kernel needs. `affine=False` gives the parameter-free form used where the counts leave no room
    for a weight.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


def make_norm(kind: str, dim: int, affine: bool = True) -> nn.Module:
    """'layernorm' (weight and bias) or 'rmsnorm' (weight only); neither has parameters if not affine."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, affine=affine)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")
