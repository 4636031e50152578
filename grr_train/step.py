"""One optimizer step: forward and backward over the micro-batches, clipping, AdamW.

The trainer and `grr bench train` both run this, so the benchmark times the step that trains.
Two loss choices a reader should know:

- The contrastive loss is computed per micro-batch (over its `micro_batch x world_size` pairs,
  negatives gathered across ranks: the run's contrastive batch) and averaged over micro-batches,
  as the paper did with gradient accumulation; it is not the loss of the whole global batch.
- The caption loss of a step is the mean over every valid target token of the global batch:
  each micro-batch's token-loss sum is divided by the step's total token count (one small
  all-reduce before the forward passes), so accumulation and DDP give the same caption loss
  as one big batch would.

The host waits for the GPU once per step, after clipping: the token count, the losses, the
gradient norm and the stop flag come back in one transfer, and the optimizer steps only when
they are finite. Nothing inside the micro-batch loop reads a value back.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from grr_data.layout import SpecialIds
from grr_train.distributed import all_reduce_sum
from grr_train.losses import caption_loss, contrastive_loss, counted_targets
from grr_train.precision import autocast_context


@dataclass(frozen=True)
class StepSettings:
    lambda_con: float
    lambda_cap: float
    grad_clip: float
    temperature: float
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None


class TrainStep:
    """`step(micro_batches, stop_flag)` -> the step's metrics, every rank's the same (global)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, special: SpecialIds,
                 settings: StepSettings, device: torch.device) -> None:
        self.model, self.optimizer, self.special = model, optimizer, special
        self.settings, self.device = settings, device
        self.ignored = tuple(special.ignored_targets)

    def __call__(self, micro_batches: list[dict], stop_flag: bool = False) -> dict:
        s = self.settings
        if not self.model.training:
            self.model.train()
        global_tokens = all_reduce_sum(self._count_tokens(micro_batches))
        caption_scale = (s.world_size / global_tokens).float().reshape(())

        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # contrastive, caption_sum
        distributed = s.world_size > 1
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients on the last micro-batch only.
            sync = nullcontext() if last or not distributed else self.model.no_sync()
            with sync:
                sums += self._forward_backward(batch["images"], batch["ids"], caption_scale, len(micro_batches))

        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip, foreach=True)
        flag = torch.tensor([float(stop_flag)], dtype=torch.float64, device=self.device)
        reduced = all_reduce_sum(torch.cat([sums, flag]))
        # The one read-back of the step.
        contrastive_sum, caption_sum, flags, tokens, norm = torch.cat(
            [reduced, global_tokens, grad_norm.detach().double().reshape(1)]).tolist()
        contrastive = contrastive_sum / (len(micro_batches) * s.world_size)
        caption = caption_sum / tokens
        loss = s.lambda_con * contrastive + s.lambda_cap * caption
        finite = math.isfinite(loss) and math.isfinite(norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "contrastive": contrastive, "caption": caption, "grad_norm": norm,
                "num_tokens": int(tokens), "finite": finite, "stop_requested": flags > 0}

    def _count_tokens(self, micro_batches: list[dict]) -> torch.Tensor:
        """This rank's counted caption targets, (1,) float64 on the device, without a read-back.

        Counted where the ids are: on the CPU loader's copy as a number (a device fill, no copy
        that would wait for the GPU), on the GPU (DALI) as a device sum.
        """
        counts = [counted_targets(b["ids"][:, 1:], self.ignored).sum() for b in micro_batches]
        if all(c.device.type == "cpu" for c in counts):
            return torch.full((1,), float(sum(int(c) for c in counts)), dtype=torch.float64, device=self.device)
        return torch.stack([c.to(self.device) for c in counts]).sum().double().reshape(1)

    def _forward_backward(self, images: torch.Tensor, ids: torch.Tensor, caption_scale: torch.Tensor,
                          accumulation: int) -> torch.Tensor:
        """Forward and backward one micro-batch; returns (contrastive, caption token-loss sum), detached."""
        s = self.settings
        images = images.to(self.device, non_blocking=True)
        ids = ids.to(self.device, non_blocking=True)
        with autocast_context(s.autocast_dtype, self.device):
            out = self.model(images, ids)
        contrastive = contrastive_loss(out.image_embed, out.text_embed, s.temperature, gather=True)
        caption_sum = caption_loss(out.logits, ids[:, 1:], self.ignored, reduction="sum")
        # DDP averages gradients over ranks, hence x world_size (in caption_scale) on the
        # token-normalised caption sum.
        loss = s.lambda_con * contrastive / accumulation + s.lambda_cap * caption_sum * caption_scale
        loss.backward()
        return torch.stack([contrastive.detach(), caption_sum.detach()]).double()
