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

The host need not wait for the GPU at all: the finite check runs on the device and gates fused
AdamW through its `found_inf` input (as torch's GradScaler does: a flagged step changes no
weight or moment, and the step count it adds is subtracted again), so `launch()` enqueues the
whole step, optimizer included, and returns a `PendingStep` whose metrics (token count, losses,
gradient norm, the stop flag, whether the update was applied) come back in one copy started
after clipping. `result()` waits for that copy only: a caller that launches step N+1 before
reading step N's metrics keeps the GPU fed (`grr bench train --read-back deferred`). `step(...)` is launch
then result (one wait per step). Nothing inside the micro-batch loop reads a value back (but
`trim_text_padding`, which reads each micro-batch's longest caption: for eager CPU runs). An
optimizer that is not fused AdamW on plain tensors (FSDP2's DTensors: their fused step has no
`found_inf` path here) is gated on the host instead, which reads the metrics back at launch.

Speed settings that keep the maths (`StepSettings`; grr_train/runtime/parallel.py resolves their `auto`):
`fused_caption_loss` takes the caption loss from the model's forward, computed with the LM head in
chunks (no full logits); `clip_in_optimizer` clips through fused AdamW's `grad_scale` (the step
divides each gradient by it as it reads it, as for GradScaler's unscaling), so no pass of its own
rescales the gradients; `contrastive_groups` splits a micro-batch into that many contrastive
batches, each its own contrastive loss (a micro-batch of 384 as two of 192); `trim_bucket` rounds
trimmed caption lengths up to a multiple, so compiled blocks see a few shapes.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from grr_data.format.layout import SpecialIds
from grr_train.runtime.distributed import all_reduce_sum
from grr_train.runtime.parallel import TRIM_BUCKET, clip_grad_norm, grad_norm, no_sync, resolve_switch
from grr_train.runtime.precision import autocast_context
from grr_train.train.losses import caption_loss, contrastive_loss, counted_targets


@dataclass(frozen=True)
class StepSettings:
    lambda_con: float
    lambda_cap: float
    grad_clip: float
    temperature: float
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None
    # Text decoders over the positions a micro-batch uses only (CoCa.forward's trim_padding): one
    # host read per micro-batch (TrainConfig.trim_text_padding); lengths rounded up to trim_bucket.
    trim_text_padding: bool = False
    trim_bucket: int = 1
    fused_caption_loss: bool = False
    clip_in_optimizer: bool = False
    contrastive_groups: int = 1

    @classmethod
    def for_run(cls, cfg, temperature: float, world_size: int, autocast_dtype: torch.dtype | None,
                device: torch.device, compile_mode: str) -> StepSettings:
        """A run's step settings from its TrainConfig (speed switches resolved for `device`)."""
        return cls(lambda_con=cfg.lambda_con, lambda_cap=cfg.lambda_cap, grad_clip=cfg.grad_clip,
                   temperature=temperature, world_size=world_size, autocast_dtype=autocast_dtype,
                   trim_text_padding=cfg.trim_text_padding, trim_bucket=TRIM_BUCKET if compile_mode != "off" else 1,
                   fused_caption_loss=resolve_switch("fused_caption_loss", cfg.fused_caption_loss, device),
                   clip_in_optimizer=resolve_switch("clip_in_optimizer", cfg.clip_in_optimizer, device),
                   contrastive_groups=cfg.micro_batch_groups)


class PendingStep:
    """A launched step's metrics on their way to the host; `result()` waits for them (once)."""

    def __init__(self, stats: torch.Tensor, micro_batches: int, settings: StepSettings):
        self.micro_batches, self.settings, self._metrics = micro_batches, settings, None
        self._ready = None
        if stats.device.type == "cuda":  # copied behind the step's kernels; only this copy is waited for
            self._host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self._host.copy_(stats, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = stats

    def result(self) -> dict:
        """The step's global metrics: loss, contrastive, caption, grad_norm, num_tokens, finite
        (the update was applied), stop_requested."""
        if self._metrics is None:
            if self._ready is not None:
                self._ready.synchronize()
            s = self.settings
            contrastive_sum, caption_sum, flags, tokens, norm, applied = self._host.tolist()
            contrastive = contrastive_sum / (self.micro_batches * s.world_size)
            caption = caption_sum / tokens
            loss = s.lambda_con * contrastive + s.lambda_cap * caption
            self._metrics = {"loss": loss, "contrastive": contrastive, "caption": caption, "grad_norm": norm,
                             "num_tokens": int(tokens), "finite": applied > 0, "stop_requested": flags > 0}
        return self._metrics


class TrainStep:
    """`step(micro_batches, stop_flag)` -> the step's metrics, every rank's the same (global);
    `launch(...)` -> a PendingStep: the same step, enqueued without waiting for the GPU."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, special: SpecialIds,
                 settings: StepSettings, device: torch.device) -> None:
        self.model, self.optimizer, self.special = model, optimizer, special
        self.settings, self.device = settings, device
        self.ignored = tuple(special.ignored_targets)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.gate_on_device = (isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))
                               and not any(isinstance(p, DTensor) for p in params))

    def __call__(self, micro_batches: list[dict], stop_flag: bool = False) -> dict:
        return self.launch(micro_batches, stop_flag).result()

    def launch(self, micro_batches: list[dict], stop_flag: bool = False) -> PendingStep:
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
            sync = nullcontext() if last or not distributed else no_sync(self.model)
            with sync:
                sums += self._forward_backward(batch["images"], batch["ids"], caption_scale, len(micro_batches))

        fold_clip = s.clip_in_optimizer and self.gate_on_device
        norm = grad_norm(self.model) if fold_clip else clip_grad_norm(self.model, s.grad_clip)  # before clipping
        # A fill, not torch.tensor([...], device=...): copying host data to the GPU waits for it.
        flag = torch.full((1,), float(stop_flag), dtype=torch.float64, device=self.device)
        reduced = all_reduce_sum(torch.cat([sums, flag]))
        stats = torch.cat([reduced, global_tokens, norm.detach().double().reshape(1)])
        # The loss as PendingStep.result computes it from these values, in float64.
        loss = (s.lambda_con * (stats[0] / (len(micro_batches) * s.world_size))
                + s.lambda_cap * (stats[1] / stats[3]))
        if self.gate_on_device:
            finite = torch.isfinite(loss) & torch.isfinite(stats[4])
            pending = PendingStep(torch.cat([stats, finite.double().reshape(1)]), len(micro_batches), s)
            # clip_grad_norm_'s factor, min(1, max_norm / (norm + 1e-6)), as the divisor fused AdamW applies
            grad_scale = (norm.float() + 1e-6).div(s.grad_clip).clamp(min=1.0).reshape(1) if fold_clip else None
            self.optimizer.grad_scale, self.optimizer.found_inf = grad_scale, (~finite).float()
            try:
                self.optimizer.step()  # a flagged step: no weight or moment changes, step count undone
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        else:
            finite = math.isfinite(loss.item()) and math.isfinite(stats[4].item())  # waits for the GPU
            pending = PendingStep(torch.cat([stats, stats.new_tensor([float(finite)])]), len(micro_batches), s)
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return pending

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
        options = {}
        if s.trim_text_padding:
            options.update(trim_padding=True, trim_bucket=s.trim_bucket)
        if s.fused_caption_loss:
            options["caption_loss_ignoring"] = self.ignored
        with autocast_context(s.autocast_dtype, self.device):
            out = self.model(images, ids, **options)
        contrastive = self._contrastive(out.image_embed, out.text_embed)
        if s.fused_caption_loss:
            caption_sum = out.caption_sum
        else:
            caption_sum = caption_loss(out.logits, out.targets(ids), self.ignored, reduction="sum")
        # DDP averages gradients over ranks, hence x world_size (in caption_scale) on the
        # token-normalised caption sum.
        loss = s.lambda_con * contrastive / accumulation + s.lambda_cap * caption_sum * caption_scale
        loss.backward()
        return torch.stack([contrastive.detach(), caption_sum.detach()]).double()

    def _contrastive(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        """The micro-batch's contrastive loss: the mean over its `contrastive_groups` consecutive row
        groups of each group's loss (negatives gathered across ranks per group)."""
        s = self.settings
        groups = s.contrastive_groups
        if groups == 1:
            return contrastive_loss(image_embed, text_embed, s.temperature, gather=True)
        if image_embed.shape[0] % groups:
            raise ValueError(f"a micro-batch of {image_embed.shape[0]} does not split into {groups} contrastive groups")
        pairs = zip(image_embed.chunk(groups), text_embed.chunk(groups), strict=True)
        return torch.stack([contrastive_loss(i, t, s.temperature, gather=True) for i, t in pairs]).mean()
