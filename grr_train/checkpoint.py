"""Run folders and checkpoints (CONTRACTS.md "Checkpoints"): atomic saves, pruning, loading.

A run folder holds `config.json`, `metrics.jsonl`, `checkpoints/step-NNNNNNN/` and, when
early stopping keeps one, `best/`. A checkpoint folder holds `model.safetensors` (the
unwrapped model's weights), `state.pt` (optimizer, schedule, early stopper, loader positions
and RNG states per rank: tensors and plain containers only, read with `weights_only=True`)
and `meta.json` (step, epoch, the model and training configs and the tokenizer, so a
checkpoint folder is enough to rebuild its model and turn its captions into text).

Durability: every file and folder is written under a temporary name, fsync'ed, renamed into
place, and the parent folder fsync'ed, so a crash or power loss leaves either the old or the
new checkpoint, never a torn one. `meta.json` (written last) records the size of each other
file; `checkpoints/latest` names the newest checkpoint, and `latest_checkpoint` falls back to
the newest complete one (saying so) when the one it names is missing or has wrong sizes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from grr_data.layout import SpecialIds
from grr_train.model import ModelConfig, build_model

FORMAT_VERSION = 1
WEIGHTS, STATE, META = "model.safetensors", "state.pt", "meta.json"


def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk (folders: their entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_text_synced(tmp, json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    _fsync_path(path.parent)


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
    _fsync_path(final.parent)  # the rename itself must survive a crash
    if old is not None:
        shutil.rmtree(old)


def _write_checkpoint_dir(tmp: Path, model: torch.nn.Module, state: dict, meta: dict) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_safetensors_model(model, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        files = {}
        for name in (WEIGHTS, STATE):
            _fsync_path(tmp / name)
            files[name] = {"size": (tmp / name).stat().st_size}
        record = {"format_version": FORMAT_VERSION, **meta, "files": files}
        _write_text_synced(tmp / META, json.dumps(record, indent=2) + "\n")
        _fsync_path(tmp)
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
    _write_text_synced(tmp_latest, final.name + "\n")
    os.replace(tmp_latest, latest)
    _fsync_path(ckpt_root)
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def save_best(run_dir: Path, model: torch.nn.Module, state: dict, meta: dict) -> Path:
    final = Path(run_dir) / "best"
    tmp = Path(run_dir) / f".tmp-best-{os.getpid()}"
    _write_checkpoint_dir(tmp, model, state, meta)
    _replace_dir(tmp, final)
    return final


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why the checkpoint folder `ckpt` is not complete, or None when it is.

    Complete: meta.json reads and every file it lists has the recorded size (checkpoints from
    before sizes were recorded are judged by their meta.json alone).
    """
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as err:
        return f"cannot read {META} ({err})"
    for name, entry in meta.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, {META} says {entry['size']}"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names or, when that one is incomplete, the newest
    complete `step-*` folder (with a warning on stderr); None when the run has none."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    ckpt = latest.parent / latest.read_text().strip()
    problem = checkpoint_problem(ckpt)
    if problem is None:
        return ckpt
    for other in sorted((p for p in latest.parent.glob("step-*") if p.is_dir() and p != ckpt), reverse=True):
        if checkpoint_problem(other) is None:
            print(f"warning: {latest} names {ckpt.name}, which is incomplete ({problem}); "
                  f"using {other.name}, the newest complete checkpoint", file=sys.stderr)
            return other
    raise FileNotFoundError(f"{latest} names {ckpt.name}, which is incomplete ({problem}), and no other "
                            f"checkpoint in {latest.parent} is complete; start a new run (another --out)")


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


def rng_state(device: torch.device | str | None = None) -> dict:
    """This process's RNG states as tensors and plain values (safe for `weights_only` loading).

    On a CUDA `device`, its generator only: each rank saves the GPU it uses, not every GPU.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "python": random.getstate(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    """Restore `rng_state(device)`; the CUDA state goes to `device`, the GPU this rank uses."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, list):  # saved before per-device states: every GPU's, this rank's by index
            cuda = cuda[torch.device(device).index or 0]
        torch.cuda.set_rng_state(cuda, torch.device(device))
