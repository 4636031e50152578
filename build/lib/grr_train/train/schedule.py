"""The learning-rate schedule: linear warm-up, then cosine annealing with warm restarts (SGDR).

The rule, with `s` the number of optimizer steps already taken (0 for the first step),
`W` the warm-up steps and `T` the optimizer steps in one epoch (one cycle per epoch):

- warm-up, `s < W`: `lr = lr_max * (s + 1) / W`, so the first step is not wasted at 0 and
  step `W - 1` runs at `lr_max`;
- afterwards: `t = (s - W) mod T`, `lr = lr_min + (lr_max - lr_min) * (1 + cos(pi * t / T)) / 2`.

So the first cycle starts at `lr_max` on the step right after warm-up, and every cycle is `T`
steps long counted from there (as `SequentialLR(LinearLR, CosineAnnealingWarmRestarts,
milestones=[W])` does): with a warm-up the restarts are `W mod T` steps off the epoch
boundaries. Fine-tuning has `W = 0`, so there each cycle is exactly one epoch.
`scale` multiplies both bounds: the early stopper's soft reset divides them by 100 per level.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr_max: float, lr_min: float, warmup_steps: int, cycle_steps: int,
          scale: float = 1.0) -> float:
    """The learning rate of the optimizer step that follows `step` completed steps."""
    if cycle_steps < 1:
        raise ValueError(f"cycle_steps must be at least 1, got {cycle_steps}")
    hi, lo = lr_max * scale, lr_min * scale
    if step < warmup_steps:
        return hi * (step + 1) / warmup_steps
    t = (step - warmup_steps) % cycle_steps
    return lo + (hi - lo) * (1.0 + math.cos(math.pi * t / cycle_steps)) / 2.0


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
