"""Run folders and checkpoints (CONTRACTS.md "Checkpoints"): atomic saves, pruning, loading.

A run folder holds `config.json`, `metrics.jsonl`, `checkpoints/step-NNNNNNN/` and, when
early stopping keeps one, `best/`. A checkpoint folder holds `model.safetensors` (the
unwrapped model's weights), `state.pt` (optimizer, schedule, early stopper, loader positions
and RNG states per rank: tensors and plain containers only, read with `weights_only=True`)
and `meta.json` (step, epoch, the model and training configs and the tokenizer, so a
checkpoint folder is enough to rebuild its model and turn its captions into text). Every folder is written under a temporary name and renamed
into place; `checkpoints/latest` names the newest complete checkpoint and is written last.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from grr_data.layout import SpecialIds
from grr_train.model import ModelConfig, build_model

FORMAT_VERSION = 1
WEIGHTS, STATE, META = "model.safetensors", "state.pt", "meta.json"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_run_config(run_dir: Path, model_config: dict, train_config: dict, special: SpecialIds,
                     tokenizer: dict | None) -> None:
    """`tokenizer`: the training set's manifest.json entry (name, vocab_size, special ids), so
    captions can be decoded to text without the training data."""
    write_json_atomic(Path(run_dir) / "config.json", {"model": model_config, "train": train_config,
                                                      "special": special.to_dict(), "tokenizer": tokenizer})


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an older `final` if there is one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)


def _write_checkpoint_dir(tmp: Path, model: torch.nn.Module, state: dict, meta: dict) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_safetensors_model(model, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: Path, model: torch.nn.Module, state: dict, meta: dict, keep: int) -> Path:
    """Write `checkpoints/step-NNNNNNN` atomically, point `latest` at it, keep the newest `keep`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{meta['step']:07d}"
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    _write_checkpoint_dir(tmp, model, state, meta)
    _replace_dir(tmp, final)
    latest = ckpt_root / "latest"
    tmp_latest = ckpt_root / f".latest.tmp-{os.getpid()}"
    tmp_latest.write_text(final.name + "\n")
    os.replace(tmp_latest, latest)
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def save_best(run_dir: Path, model: torch.nn.Module, state: dict, meta: dict) -> Path:
    final = Path(run_dir) / "best"
    tmp = Path(run_dir) / f".tmp-best-{os.getpid()}"
    _write_checkpoint_dir(tmp, model, state, meta)
    _replace_dir(tmp, final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    ckpt = latest.parent / latest.read_text().strip()
    if not (ckpt / META).is_file():
        raise FileNotFoundError(f"{latest} names {ckpt.name}, which is missing or incomplete")
    return ckpt


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A checkpoint folder from a run folder (its `best/`, else its latest), a checkpoint or its weights."""
    path = Path(run_or_ckpt)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if (path / WEIGHTS).is_file():
        return path
    if (path / "best" / WEIGHTS).is_file():
        return path / "best"
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None:
        raise FileNotFoundError(
            f"{path}: not a run folder with checkpoints, nor a checkpoint folder holding {WEIGHTS}"
        )
    return ckpt


def read_meta(ckpt: Path) -> dict:
    meta = json.loads((Path(ckpt) / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{ckpt}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def load_state(ckpt: Path, device: str | torch.device = "cpu") -> dict:
    return torch.load(Path(ckpt) / STATE, map_location=device, weights_only=True)


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    load_safetensors_model(model, str(Path(ckpt) / WEIGHTS), strict=True)


def load_model(run_or_ckpt: str | Path, device: str | torch.device = "cpu", **config_overrides):
    """Rebuild a model from a run or checkpoint folder -> (model in eval mode, info).

    `info` has `model_config`, `train_config`, `special` (SpecialIds), `tokenizer` (the training
    set's manifest entry: name, vocab_size, special ids; None for checkpoints from before it was
    recorded), `step` and `checkpoint`.
    `config_overrides` change model config fields before building (e.g. `dropout`).
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


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (safe for `weights_only` loading)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
