"""The caption loss taken straight from the LM head's input: the summed token cross-entropy of
`hidden @ W.T + b` against the targets, without the (N, V) logits ever existing whole.

Training needs only the loss and its gradients, not the logits: at micro-batch 192 they are
12,288 x 32,102 values, written by the head, copied to float32 by the loss, read again in the
backward and written once more as their gradient (~10 GB of memory traffic a step, 0.8 GB held
for the backward). Here the rows go through in chunks: each chunk's logits are made, turned into
its loss and into the gradients of the head's input, weight and bias, and dropped. The gradients
are finished in the forward (the loss is a sum, so the backward only scales them by the incoming
gradient), as Liger-Kernel's fused linear cross-entropy does; nothing of size (N, V) is kept.

`padded_vocab` (from `grr_train.runtime.parallel.align_widths`): the head runs at a vocabulary padded to an
aligned width (32,102 -> 32,128), the padding rows of W zero and their biases -inf, so a padded
logit is -inf: it adds exp(-inf) = 0 to every sum and gets a zero gradient, and its rows of the
weight's gradient are dropped. The parameters stay (V, D) and (V,).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

# Rows per chunk: 4,096 x 32,128 bf16 logits are 263 MB; larger chunks mean fuller GEMMs.
HEAD_CHUNK_ROWS = 4096


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, counted, padded_vocab: int, chunk_rows: int, dtype):
        # hidden (N, D), weight (V, D), bias (V,), targets (N,) int64 < V, counted (N,) float32 in {0, 1}
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        wants_grad = any(ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):
            h, w, b = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
            if padded_vocab > vocab:
                w = F.pad(w, (0, 0, 0, padded_vocab - vocab))
                b = F.pad(b, (0, padded_vocab - vocab), value=float("-inf"))
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(h) if wants_grad else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if wants_grad else None
            grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if wants_grad else None
            for start in range(0, num_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = torch.addmm(b, h[rows], w.t()).float()  # (n, padded V)
                lse = logits.logsumexp(dim=-1)
                picked = logits.gather(1, targets[rows, None])[:, 0]
                total += ((lse - picked) * counted[rows]).sum()
                if not wants_grad:
                    continue
                # d(sum of counted token losses) / d(logits) = (softmax - one-hot), zero on rows not counted
                probs = (logits - lse[:, None]).exp_()
                probs.scatter_add_(1, targets[rows, None], torch.full_like(lse[:, None], -1.0))
                g = (probs * counted[rows, None]).to(dtype)
                grad_h[rows] = g @ w
                grad_w += (g.t() @ h[rows]).float()
                grad_b += g.float().sum(dim=0)
        if wants_grad:
            ctx.save_for_backward(grad_h, grad_w[:vocab], grad_b[:vocab])
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return ((grad_h * grad_total).to(ctx.hidden_dtype), grad_w * grad_total, grad_b * grad_total,
                None, None, None, None, None)


def counted_targets(targets: torch.Tensor, ignore_ids: Iterable[int]) -> torch.Tensor:
    """Bool mask (B, T): the targets the caption loss counts (none of `ignore_ids`)."""
    valid = torch.ones_like(targets, dtype=torch.bool)
    for token in ignore_ids:
        valid &= targets != token
    return valid


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             targets: torch.Tensor, ignore_ids: Iterable[int], padded_vocab: int | None = None,
                             chunk_rows: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """sum over counted targets of cross-entropy(hidden @ weight.T + bias, target), a float32 scalar.

    hidden (B, T, D), targets (B, T); targets equal to an id of `ignore_ids` count nothing. The
    head computes in autocast's dtype where autocast is on (as `nn.Linear` would), else in
    hidden's; the loss and its statistics are float32. Gradients reach hidden, weight and bias.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    vocab = weight.shape[0]
    return _LinearCrossEntropySum.apply(
        hidden.flatten(0, -2), weight, bias, targets.flatten(), counted_targets(targets, ignore_ids).flatten().float(),
        max(padded_vocab or vocab, vocab), chunk_rows, dtype)
