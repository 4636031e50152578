"""The CoCa losses (paper 3.5): contrastive (eq. 2), captioning (eq. 3-4), their sum (eq. 6)
and perplexity (eq. 5)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from grr_train.model.coca import caption_targets
from grr_train.model.head_loss import counted_targets
from grr_train.runtime.distributed import all_gather_with_grad, distributed_world


def contrastive_loss(
    image_embed: torch.Tensor, text_embed: torch.Tensor, temperature: float, gather: bool = True
) -> torch.Tensor:
    """Paper eq. 2, exactly: -(1/N) [sum_i log softmax_j(x_i.y_j / s)_i + sum_i log softmax_j(y_i.x_j / s)_i].

    That is the SUM of the image-to-text and text-to-image mean cross-entropies (CLIP and CoCa
    take their average, half this value); we keep the paper's definition so figures compare.
    Embeddings (B, D) are expected L2-normalised. Under DDP with `gather`, every rank's samples
    are negatives: local row i of rank r is matched with column r * B + i of the gathered batch.
    Each rank returns the mean over its own rows; DDP's gradient averaging makes that the
    gradient of the full-batch loss, and the mean of the ranks' values is the full-batch value.
    """
    rank, world = distributed_world()
    if gather and world > 1:
        all_images = all_gather_with_grad(image_embed)
        all_texts = all_gather_with_grad(text_embed)
        offset = rank * image_embed.shape[0]
    else:
        all_images, all_texts, offset = image_embed, text_embed, 0
    labels = torch.arange(image_embed.shape[0], device=image_embed.device) + offset
    image_to_text = image_embed.float() @ all_texts.float().T / temperature  # (B, world * B)
    text_to_image = text_embed.float() @ all_images.float().T / temperature
    return F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)


# Rows of logits per float32 chunk of the caption loss: 2,048 x 32,102 x 4 bytes = 263 MB at most.
CAPTION_CHUNK_ROWS = 2048


class _TokenCrossEntropySum(torch.autograd.Function):
    """sum over counted rows of logsumexp(row) - row[target], chunk by chunk in float32.

    What `F.cross_entropy(logits.float(), ...)` computes, without its full float32 copy of the
    (B x 64, V) logits and without keeping a float32 log-softmax for backward (1.6 GB each at a
    micro-batch of 192): backward recomputes each chunk's softmax from the saved logits and the
    per-row logsumexp. The gradient has the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # logits (N, V), targets (N,) int64, weights (N,) float32: 1 for counted rows, 0 for ignored
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], CAPTION_CHUNK_ROWS):
            rows = slice(start, start + CAPTION_CHUNK_ROWS)
            chunk = logits[rows].float()
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(1, targets[rows, None])[:, 0]
            total += ((lse[rows] - picked) * weights[rows]).sum()
        ctx.save_for_backward(logits, targets, weights, lse)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets, weights, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = weights * grad_total  # (N,)
        for start in range(0, logits.shape[0], CAPTION_CHUNK_ROWS):
            rows = slice(start, start + CAPTION_CHUNK_ROWS)
            probs = (logits[rows].float() - lse[rows, None]).exp_()  # softmax of the chunk
            probs.scatter_add_(1, targets[rows, None], -torch.ones_like(lse[rows, None]))
            grad[rows] = probs.mul_(scale[rows, None])
        return grad, None, None


def caption_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_ids: Iterable[int], reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T) = ids[:, 1:], eq. 3-4.

    Targets equal to any of `ignore_ids` (BOS, PAD, CLS) count nothing. 'sum' is eq. 4's summed
    loss; 'mean' divides by the number of counted targets (0 when there is none). Computed in
    float32 whatever the logits' dtype, in chunks (see `_TokenCrossEntropySum`).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}; expected 'mean' or 'sum'")
    valid = counted_targets(targets, ignore_ids)
    total = _TokenCrossEntropySum.apply(logits.flatten(0, 1), targets.flatten(), valid.flatten().float())
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def coca_loss(
    out,
    ids: torch.Tensor,
    special,
    lambda_con: float,
    lambda_cap: float,
    temperature: float,
    gather: bool = True,
) -> dict[str, torch.Tensor]:
    """Eq. 6 on one batch: lambda_con * contrastive + lambda_cap * caption (its per-token mean).

    `out` has image_embed, text_embed, logits (B, T, V) and, from a forward that trimmed padding,
    the `positions` they are for (CocaOutput; without: all positions); ids are the laid-out (B, 65)
    ids; `special` gives `ignored_targets` (SpecialIds). caption_sum and num_tokens are detached, for
    accumulating perplexity over a set. This is the single-batch form (`grr bench train` uses
    it); the trainer normalises the caption term by the whole global batch's token count
    instead (see grr_train/train/trainer.py), which is the same on one process without accumulation.
    """
    targets = caption_targets(ids, getattr(out, "positions", None))
    ignored = special.ignored_targets
    contrastive = contrastive_loss(out.image_embed, out.text_embed, temperature, gather=gather)
    caption_sum = caption_loss(out.logits, targets, ignored, reduction="sum")
    num_tokens = counted_targets(targets, ignored).sum()
    caption = caption_sum / num_tokens.clamp(min=1)
    return {
        "loss": lambda_con * contrastive + lambda_cap * caption,
        "contrastive": contrastive,
        "caption": caption,
        "caption_sum": caption_sum.detach(),
        "num_tokens": num_tokens,
    }


def perplexity(caption_sum_total: float | torch.Tensor, num_tokens_total: int | torch.Tensor) -> float:
    """Eq. 5 over a whole set: exp(summed token loss / number of counted tokens)."""
    num = float(num_tokens_total)
    if num <= 0:
        raise ValueError("perplexity over zero caption tokens: the set has no countable targets")
    return math.exp(float(caption_sum_total) / num)
