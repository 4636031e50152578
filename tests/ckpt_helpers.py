"""Saving a whole checkpoint by step, as the trainer does, for tests that need a run folder
without training one (the trainer itself goes through grr_train.runs.checkpoint.save_whole)."""

from __future__ import annotations

from pathlib import Path

import torch

from grr_train.runs.checkpoint import checkpoint_folder, save_whole


def save_checkpoint(run_dir: Path | str, model: torch.nn.Module, state: dict, meta: dict, keep: int) -> Path:
    """Write `checkpoints/step-NNNNNNN` (the step of `meta`) atomically, point `latest` at it,
    keep the newest `keep`."""
    return save_whole(checkpoint_folder(Path(run_dir), meta["step"]), model, state, meta, keep)


def save_best(run_dir: Path | str, model: torch.nn.Module, state: dict, meta: dict) -> Path:
    """Write the run's `best/` checkpoint, as early stopping does."""
    return save_whole(checkpoint_folder(Path(run_dir), None), model, state, meta, None)
