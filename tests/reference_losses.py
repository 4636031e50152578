"""The paper's losses written out independently of grr_train.train.losses, for expected values in tests.

Eq. 2 from log-softmax rows and columns of the similarity matrix (not F.cross_entropy with labels,
as the code does), eq. 3-4 with F.cross_entropy over the counted targets only, eq. 6 as a weighted
sum, eq. 5 as exp of the token-mean. Differentiable, so gradients can be compared as well."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def contrastive(image_embed: torch.Tensor, text_embed: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2: -(1/N) sum_i [log softmax_j(x_i.y_j / s)_i + log softmax_j(y_i.x_j / s)_i]."""
    sim = image_embed.double() @ text_embed.double().T / temperature  # sim[i, j] = x_i . y_j / s
    n = sim.shape[0]
    image_to_text = sim.log_softmax(dim=1).diagonal().sum()
    text_to_image = sim.T.log_softmax(dim=1).diagonal().sum()
    return -(image_to_text + text_to_image) / n


def counted(targets: torch.Tensor, ignored) -> torch.Tensor:
    keep = torch.ones_like(targets, dtype=torch.bool)
    for token in ignored:
        keep &= targets != token
    return keep


def caption_sum(logits: torch.Tensor, targets: torch.Tensor, ignored) -> torch.Tensor:
    """Eq. 4 summed: the cross-entropy of every counted target (targets = ids[:, 1:])."""
    keep = counted(targets, ignored)
    return F.cross_entropy(logits[keep].double(), targets[keep], reduction="sum")


def coca(lambda_con: float, lambda_cap: float, contrastive_value, caption_value):
    """Eq. 6."""
    return lambda_con * contrastive_value + lambda_cap * caption_value


def perplexity(caption_mean: float) -> float:
    """Eq. 5 from the token-mean caption loss."""
    return math.exp(caption_mean)
