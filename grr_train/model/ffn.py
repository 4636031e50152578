"""Feed-forward layers: the ViT's GELU MLP and the GEGLU of paper eq. 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, both with bias (the original ViT feed-forward)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class GEGLU(nn.Module):
    """(GELU(xW + Wb) * (xV + Vb)) O + Ob, paper eq. 1.

    Bias on all three linears: with hidden int(768 * 2.7) = 2073 that is what makes the ViT's
    per-block change, times 12, equal the paper's 685,656 parameter difference (docs/DESIGN.md, "Parameter counts").
    W and V are one Linear(dim, 2 * hidden), which has the same parameters as two.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.wv = nn.Linear(dim, 2 * hidden)
        self.o = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.wv(x).chunk(2, dim=-1)
        return self.o(F.gelu(gate) * value)


def make_ffn(kind: str, dim: int, hidden: int) -> nn.Module:
    if kind == "mlp":
        return Mlp(dim, hidden)
    if kind == "geglu":
        return GEGLU(dim, hidden)
    raise ValueError(f"unknown feed-forward {kind!r}; expected 'mlp' or 'geglu'")
