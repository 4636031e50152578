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

    `padded_hidden` (set at run time by `grr_train.runtime.parallel.align_widths`, not a parameter): the
    width the matmuls run at. 2073 is odd, so the value half of W and V's output starts at an
    unaligned offset and the GEMMs run on shapes GPU kernels tile poorly; padded to 2080, each half
    gets zero rows and O zero columns, copied in the forward from the real weights, so the padded
    units compute GELU(0) * 0 = 0 and their gradients are dropped: the same outputs and gradients,
    while the parameters, their count and the state dict stay at 2073.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.padded_hidden = hidden
        self.wv = nn.Linear(dim, 2 * hidden)
        self.o = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.padded_hidden - self.hidden
        if extra == 0:
            gate, value = self.wv(x).chunk(2, dim=-1)
            return self.o(F.gelu(gate) * value)
        # (2 * hidden, D) -> (2, hidden, D) -> zero rows after each half -> (2 * padded, D)
        wv = F.pad(self.wv.weight.unflatten(0, (2, self.hidden)), (0, 0, 0, extra)).flatten(0, 1)
        bias = F.pad(self.wv.bias.unflatten(0, (2, self.hidden)), (0, extra)).flatten()
        gate, value = F.linear(x, wv, bias).chunk(2, dim=-1)
        return F.linear(F.gelu(gate) * value, F.pad(self.o.weight, (0, extra)), self.o.bias)


def make_ffn(kind: str, dim: int, hidden: int) -> nn.Module:
    if kind == "mlp":
        return Mlp(dim, hidden)
    if kind == "geglu":
        return GEGLU(dim, hidden)
    raise ValueError(f"unknown feed-forward {kind!r}; expected 'mlp' or 'geglu'")
