"""The cascaded attention poolers (paper 3.3, CoCa's best variant): 256 patch tokens -> generative
pooler (64 learned queries) -> contrastive pooler (1 learned query) over the 64 pooled tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from grr_train.model.attention import Attention
from grr_train.model.norms import RMSNorm


class CascadedPoolers(nn.Module):
    """Returns (contrastive token (B, D), generative tokens (B, Q, D)).

    The paper's totals leave room for exactly 65 query vectors and ONE attention module
    (4 * D * D + 4 * D) besides the two projections (docs/DESIGN.md, "Parameter counts"), so both stages
    share this attention module; only their queries differ.
    """

    def __init__(self, dim: int, heads: int, num_queries: int, dropout: float) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.empty(num_queries + 1, dim))  # generative ones, then contrastive
        self.attn = Attention(dim, heads, dropout, cross=True)
        # CoCa normalises the pooled tokens; the counts leave no room for a learnable norm, so it
        # is parameter-free. Without it the second stage attends over tokens of ~1e-3 scale and
        # the contrastive gradients start at ~1e3-1e4.
        self.norm = RMSNorm(dim, affine=False)

    def forward(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = patch_tokens.shape[0]
        generative_q = self.queries[: self.num_queries].unsqueeze(0).expand(b, -1, -1)
        contrastive_q = self.queries[self.num_queries :].unsqueeze(0).expand(b, -1, -1)
        generative = self.norm(self.attn(generative_q, context=patch_tokens))  # (B, Q, D)
        contrastive = self.attn(contrastive_q, context=generative)  # (B, 1, D)
        return contrastive[:, 0], generative
