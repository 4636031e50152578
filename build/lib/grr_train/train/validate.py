"""Validation over a whole split (CONTRACTS.md "Validation"): the paper's Table 2 metrics.

The caption loss and perplexity are token-weighted over the split (eq. 5: exp of the sum of
token losses over the number of valid tokens). The contrastive loss depends on how many
negatives it sees, so it is taken over consecutive chunks of exactly
`contrastive_batch_size` samples, whatever the loader's batch size, and averaged over the
chunks; a smaller last chunk is dropped and counted. The CoCa loss is
`lambda_con * contrastive + lambda_cap * caption` of those two split-level figures.
Every usable sample of the split counts exactly once: the loader pads its last global step
with repeats so ranks stay in step and replaces an unusable sample by another of its batch,
and each batch's `real` mask (B,) marks the slots holding a sample for the first time. Under
DDP each rank validates its own share of the split and the caption sums are added up; the
contrastive chunks are cut from all ranks' real samples in plan order, so every number is the
same whatever the number of ranks.
"""

from __future__ import annotations

import math

import torch

from grr_train.runtime.distributed import all_reduce_sum, gather_rows
from grr_train.runtime.precision import autocast_context
from grr_train.train.losses import caption_loss, contrastive_loss, counted_targets


@torch.no_grad()
def validate(model, loader, special, lambda_con: float, lambda_cap: float, temperature: float,
             contrastive_batch_size: int, autocast_dtype: torch.dtype | None = None,
             progress=None, should_stop=None, trim_padding: bool = False, trim_bucket: int = 1) -> dict | None:
    """`loader` yields batches with `images`, `ids` and `real` (the loader contract): only the
    samples where `real` is True count; the others are padding repeats or substitutes.

    `autocast_dtype`: run the model under autocast to this dtype (None: no autocast).
    `trim_padding`: the text decoders skip the padding no caption of a batch uses (CoCa.forward), the
    kept lengths rounded up to a multiple of `trim_bucket` (a compiled model's few shapes).
    `should_stop`: called before each batch (by every rank together); when it returns True,
    validation ends there and returns None. The model's train/eval mode is restored either way."""
    was_training = model.training
    model.eval()
    try:
        return _validate(model, loader, special, lambda_con, lambda_cap, temperature, contrastive_batch_size,
                         autocast_dtype, progress, should_stop, trim_padding, trim_bucket)
    finally:
        model.train(was_training)


def _validate(model, loader, special, lambda_con, lambda_cap, temperature, contrastive_batch_size,
              autocast_dtype, progress, should_stop, trim_padding, trim_bucket) -> dict | None:
    device = next(model.parameters()).device
    caption_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_tokens = torch.zeros((), dtype=torch.int64, device=device)
    contrastive_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_chunks = 0
    num_samples = 0
    pending = torch.zeros(0, 0, device=device)  # (n, 2D) real pairs not yet in a full chunk, global order
    for batch in loader:
        if should_stop is not None and should_stop():
            return None
        images = batch["images"].to(device, non_blocking=True)
        ids = batch["ids"].to(device, non_blocking=True)
        num_samples += int(batch["real"].sum())  # on the CPU (loader contract): no device sync
        real = batch["real"].to(device, non_blocking=True)  # (B,) bool
        # The whole batch goes through the model so every rank gathers the same shape below.
        with autocast_context(autocast_dtype, device):
            out = model(images, ids, trim_padding=True, trim_bucket=trim_bucket) if trim_padding else model(images, ids)
        targets = out.targets(ids)[real]
        caption_sum += caption_loss(out.logits[real].float(), targets, special.ignored_targets,
                                    reduction="sum").double()
        num_tokens += counted_targets(targets, special.ignored_targets).sum()
        # Contrastive chunks are cut from the real samples of all ranks in plan order, so they
        # are the same whatever the number of ranks; every rank then computes the same chunks.
        rows = gather_rows(torch.cat([out.image_embed.float(), out.text_embed.float(),
                                      real[:, None].float()], dim=1))  # (world * B, 2D + 1)
        rows = rows[rows[:, -1] > 0, :-1]
        pending = torch.cat([pending, rows]) if pending.numel() else rows
        full = pending.shape[0] // contrastive_batch_size * contrastive_batch_size
        dim = pending.shape[1] // 2
        for start in range(0, full, contrastive_batch_size):
            chunk = pending[start : start + contrastive_batch_size]
            contrastive_sum += contrastive_loss(chunk[:, :dim], chunk[:, dim:], temperature, gather=False).double()
            num_chunks += 1
        pending = pending[full:]
        if progress is not None:
            progress.update(1)
    totals = all_reduce_sum(torch.stack([
        caption_sum,
        num_tokens.double(),
        torch.tensor(float(num_samples), dtype=torch.float64, device=device),
    ]))
    caption_total, tokens, samples = totals.tolist()
    # The contrastive figures are already over the whole split, identical on every rank.
    contrastive_total, chunks, dropped = float(contrastive_sum), num_chunks, pending.shape[0]
    if tokens == 0:
        raise ValueError("validation split has no caption tokens: is the split empty?")
    caption = caption_total / tokens
    contrastive = contrastive_total / chunks if chunks else float("nan")
    return {
        "loss": lambda_con * contrastive + lambda_cap * caption,
        "contrastive": contrastive,
        "caption": caption,
        "perplexity": math.exp(caption),
        "contrastive_batch_size": contrastive_batch_size,
        "num_samples": int(samples),
        "num_tokens": int(tokens),
        "num_contrastive_dropped": int(dropped),
    }
