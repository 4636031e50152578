"""Validation over a whole split (CONTRACTS.md "Validation"): the paper's Table 2 metrics.

The caption loss and perplexity are token-weighted over the split (eq. 5: exp of the sum of
token losses over the number of valid tokens). The contrastive loss depends on how many
negatives it sees, so it is taken over consecutive chunks of exactly
`contrastive_batch_size` samples, whatever the loader's batch size, and averaged over the
chunks; a smaller last chunk is dropped and counted. The CoCa loss is
`lambda_con * contrastive + lambda_cap * caption` of those two split-level figures.
Under DDP each rank validates its own shard of the split and the sums are added up.
"""

from __future__ import annotations

import math

import torch

from grr_train.losses import caption_loss, contrastive_loss
from grr_train.parallel import all_reduce_sum


@torch.no_grad()
def validate(model, loader, special, lambda_con: float, lambda_cap: float, temperature: float,
             contrastive_batch_size: int, autocast_dtype: torch.dtype | None = None,
             progress=None) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    caption_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_tokens = 0
    contrastive_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_chunks = 0
    num_samples = 0
    pending_image, pending_text = [], []  # embeddings not yet in a full contrastive chunk
    num_pending = 0
    ignored = torch.tensor(special.ignored_targets, device=device)
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        ids = batch["ids"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = model(images, ids)
        targets = ids[:, 1:]
        caption_sum += caption_loss(out.logits.float(), targets, special.ignored_targets,
                                    reduction="sum").double()
        num_tokens += int((~torch.isin(targets, ignored)).sum())
        num_samples += ids.shape[0]
        pending_image.append(out.image_embed.float())
        pending_text.append(out.text_embed.float())
        num_pending += ids.shape[0]
        if num_pending >= contrastive_batch_size:
            image_embed, text_embed = torch.cat(pending_image), torch.cat(pending_text)
            full = num_pending // contrastive_batch_size * contrastive_batch_size
            for start in range(0, full, contrastive_batch_size):
                chunk = slice(start, start + contrastive_batch_size)
                contrastive_sum += contrastive_loss(image_embed[chunk], text_embed[chunk],
                                                    temperature, gather=False).double()
                num_chunks += 1
            pending_image, pending_text = [image_embed[full:]], [text_embed[full:]]
            num_pending -= full
        if progress is not None:
            progress.update(1)
    totals = all_reduce_sum(torch.stack([
        caption_sum, contrastive_sum,
        torch.tensor(float(num_tokens), dtype=torch.float64, device=device),
        torch.tensor(float(num_chunks), dtype=torch.float64, device=device),
        torch.tensor(float(num_samples), dtype=torch.float64, device=device),
        torch.tensor(float(num_pending), dtype=torch.float64, device=device),
    ]))
    model.train(was_training)
    caption_total, contrastive_total, tokens, chunks, samples, dropped = totals.tolist()
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
