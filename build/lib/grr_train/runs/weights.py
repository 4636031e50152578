"""Loading a checkpoint's weights into a model, from either kind of checkpoint folder (whole:
`grr_train/runs/checkpoint.py`; sharded: `grr_train/runs/sharded.py`), and rebuilding a run's
model from its folder alone (`load_model`: what eval, caption, export and `finetune --from` use).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors_file

from grr_data.format.layout import SpecialIds
from grr_train.model import ModelConfig, build_model, upgrade_state_dict
from grr_train.runs.checkpoint import (
    WEIGHTS,
    CheckpointError,
    is_sharded_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from grr_train.runs.sharded import load_whole_weights, stored_weight_names


def weight_names(ckpt: Path) -> list[str]:
    """The parameter names stored in a checkpoint (read from the weights' header or the sharded
    checkpoint's metadata only)."""
    if is_sharded_checkpoint(ckpt):
        return stored_weight_names(ckpt)
    with safe_open(str(Path(ckpt) / WEIGHTS), framework="pt") as f:
        return list(f.keys())


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load `ckpt`'s weights into `model` (a plain one, on one process), strictly. Names from
    before a change of the model's parameter names are mapped by
    `grr_train.model.upgrade_state_dict`. A sharded checkpoint is read
    whole, whatever the number of processes that saved it."""
    if is_sharded_checkpoint(ckpt):
        return load_whole_weights(model, ckpt)
    path = Path(ckpt) / WEIGHTS
    try:
        state_dict = load_safetensors_file(path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read the weights ({err}); the file is damaged") from err
    state_dict = upgrade_state_dict(state_dict)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise CheckpointError(f"{path} does not fit the model: {err}") from err
    # safetensors saves a tensor shared by several names (tied weights) under one of them only
    own = model.state_dict()
    stored = {own[name].data_ptr() for name in state_dict if name in own}
    missing = [name for name in missing if own[name].data_ptr() not in stored]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model {model.__class__.__name__}: missing "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")


def load_model(run_or_ckpt: str | Path, device: str | torch.device = "cpu", **config_overrides):
    """Rebuild a model from a run or checkpoint folder -> (model in eval mode, info).

    `info` has `model_config`, `train_config`, `special` (SpecialIds), `tokenizer` (the training
    set's manifest entry: name, vocab_size, special ids; None for checkpoints from before it was
    recorded), `step` and `checkpoint`.
    `config_overrides` change model config fields before building (e.g. `dropout`).
    The checkpoint is checked as `resolve_checkpoint` says: a damaged one named directly raises
    CheckpointError naming the file; a run folder falls back to its newest intact checkpoint.
    """
    ckpt = resolve_checkpoint(run_or_ckpt)
    meta = read_meta(ckpt)
    model_config = ModelConfig.from_dict({**meta["model_config"], **config_overrides})
    model = build_model(model_config)
    load_weights(model, ckpt)
    model.to(device).eval()
    info = {
        "model_config": model_config,
        "train_config": meta["train_config"],
        "special": SpecialIds(**meta["special"]),
        "tokenizer": meta.get("tokenizer"),
        "step": meta["step"],
        "checkpoint": ckpt,
    }
    return model, info
