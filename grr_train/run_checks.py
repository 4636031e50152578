"""What a run checks of its data before training, and the model and loaders it makes from it.

A run and its data must agree on the token layout (vocabulary size, PAD, EOS and where CLS
stands) and on the tokenizer itself: two tokenizers can share a size and special ids and still
cut words into different pieces, so runs compare the fingerprints (`files_sha256`, the hash of
the tokenizer's model files) that `grr data shard` records (grr_data/tokenizer.py). Sets and runs
from before fingerprints have none; they are compared by name and layout only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from grr_data.dataset import DatasetInfo
from grr_data.layout import CLS_INDEX, CONTEXT_LENGTH
from grr_data.loader import make_loader
from grr_train import checkpoint as ckpt
from grr_train.config import TRIM_NEEDS_EAGER, TrainConfig
from grr_train.model import ModelConfig, build_model, get_config
from grr_train.model.compat import is_old_layout
from grr_train.parallel import resolve_compile


def check_model_fits_data(model_config: ModelConfig, data: DatasetInfo) -> None:
    """Raise ValueError listing every layout constant on which the model and the data disagree."""
    special = data.special
    pairs = {"vocab_size": (model_config.vocab_size, special.vocab_size),
             "pad_id": (model_config.pad_id, special.pad), "eos_id": (model_config.eos_id, special.eos),
             "context_length": (model_config.context_length, CONTEXT_LENGTH),
             "cls_index": (model_config.cls_index, CLS_INDEX)}
    wrong = [f"{name} {ours} (model) vs {theirs} (data)" for name, (ours, theirs) in pairs.items() if ours != theirs]
    if wrong:
        raise ValueError(f"the model does not fit {data.manifest_path}: " + "; ".join(wrong))


def check_same_tokenizer(recorded: dict | None, data: DatasetInfo, whose: str, allow_other: bool = False) -> None:
    """Refuse `data` when its tokenizer differs from the one `whose` (a run, a checkpoint) recorded."""
    if not recorded:
        return
    ours = data.tokenizer.to_dict()
    theirs_files, ours_files = recorded.get("files_sha256"), ours.get("files_sha256")
    if theirs_files and ours_files:
        same = theirs_files == ours_files
    else:  # one side predates fingerprints: what both recorded must agree
        same = all(recorded.get(k) == ours.get(k) for k in ("vocab_size", "pad", "eos", "bos", "cls"))
    if same or allow_other:
        return
    raise ValueError(
        f"{whose} was trained with tokenizer {recorded.get('name')!r} ({_describe(recorded)}), but "
        f"{data.manifest_path} was sharded with {ours.get('name')!r} ({_describe(ours)}): the same ids would "
        "mean other words. Re-shard the data with the run's tokenizer, or, if you know they are the same, allow it "
        "(grr train: --set allow_other_tokenizer=true; grr eval: --allow-other-tokenizer)"
    )


def _describe(record: dict) -> str:
    files = record.get("files_sha256") or {}
    digest = ", ".join(f"{name} {sha[:12]}" for name, sha in sorted(files.items())) or "no fingerprint"
    return f"vocabulary {record.get('vocab_size')}, {digest}"


def compile_mode(cfg: TrainConfig, device: torch.device) -> str:
    """The compile mode a run uses on `device` ('auto' resolved); refuses trim_text_padding with a
    whole-model graph, which TrainConfig.validate cannot see where a mode resolves to one on a device
    (per-block compiles take trimmed lengths in buckets: grr_train/parallel.py's TRIM_BUCKET)."""
    mode = resolve_compile(cfg.compile, device)
    if cfg.trim_text_padding and mode == "model":
        raise ValueError(TRIM_NEEDS_EAGER.format(compile=f"{cfg.compile} ({mode} on {device.type})"))
    return mode


def fit_epochs_to_max_steps(cfg: TrainConfig, steps_per_epoch: int) -> tuple[TrainConfig, str | None]:
    """`cfg` with enough epochs for its max_steps, and a note when they were raised (None if not)."""
    if cfg.max_steps is None or cfg.max_steps <= cfg.epochs * steps_per_epoch:
        return cfg, None
    epochs = -(-cfg.max_steps // steps_per_epoch)
    note = (f"note: max_steps {cfg.max_steps} needs {epochs} epochs of {steps_per_epoch} steps; epochs raised "
            f"from {cfg.epochs} to {epochs}")
    return dataclasses.replace(cfg, epochs=epochs), note


def fit_batches_to_data(cfg: TrainConfig, data: DatasetInfo, world_size: int) -> tuple[TrainConfig, str | None]:
    """`cfg` with batches no larger than the splits hold, and a one-line warning saying what changed.

    The paper's batches (global 768, contrastive 192 pairs, validation chunks of 192) are for
    CC12M; on a small set they would make no whole step or a NaN validation loss. The contrastive
    batch is capped at the train split (a multiple of the processes), the global batch at the
    split and to a multiple of the contrastive batch, the validation chunk at the val split.
    """
    num_train = data.split_sizes.get("train", 0)
    num_val = data.split_sizes.get(cfg.val_split, 0)
    changes: dict = {}
    micro = cfg.micro_batch_size(world_size)
    if num_train and micro * world_size > num_train:
        micro = max(num_train // world_size, 1)
        key = "per_device_batch_size" if cfg.per_device_batch_size is not None else "contrastive_batch_size"
        changes[key] = micro if key == "per_device_batch_size" else micro * world_size
    contrastive = micro * world_size
    if num_train and (cfg.global_batch_size > num_train or (changes and cfg.global_batch_size % contrastive)):
        changes["global_batch_size"] = max(contrastive, min(cfg.global_batch_size, num_train) // contrastive * contrastive)
    if num_val and cfg.val_contrastive_batch_size > num_val:
        changes["val_contrastive_batch_size"] = num_val
    if not changes:
        return cfg, None
    was = ", ".join(f"{k} {getattr(cfg, k)}" for k in changes)
    now = ", ".join(f"{k} {v}" for k, v in changes.items())
    return dataclasses.replace(cfg, **changes), (
        f"warning: {data.manifest_path} has {num_train} train and {num_val} {cfg.val_split} pairs, fewer than the "
        f"batches asked for ({was}; the paper's are global 768, contrastive 192, validation chunks 192): "
        f"using {now}")


def default_num_workers(world_size_on_node: int = 1) -> int:
    """CPU loader workers when none are set: this process's share of the cores, less one, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(world_size_on_node, 1) - 1))


def make_loader_for(trainer, split: str, batch_size: int, shuffle: bool, prefetch: int | None = None,
                    batch_multiple: int = 1):
    """A loader over the trainer's data, on its device, with its seed and world size."""
    cfg, info = trainer.cfg, trainer.info
    # Under bf16 autocast the patch-embedding conv casts its input to bf16 anyway; float16
    # images (more precise than bf16, range ample for normalised pixels) halve what the
    # loader buffers on the GPU. CPU runs keep float32, so their results do not change.
    gpu_bf16 = trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16
    workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return make_loader(cfg.data, split=split, batch_size=batch_size, kind=cfg.loader, rank=info.rank,
                       world_size=info.world_size, seed=cfg.seed, shuffle=shuffle, num_workers=workers,
                       device=str(trainer.device), dtype=torch.float16 if gpu_bf16 else torch.float32,
                       prefetch=prefetch, batch_multiple=batch_multiple)


def build_run_model(cfg: TrainConfig, run_dir: Path, data: DatasetInfo, resume: bool):
    """(model, its config) for a run: the run's own config on resume, the --from checkpoint's for
    fine-tuning, else the preset sized to the data's vocabulary and special ids; checked against
    the data's layout and tokenizer."""
    if resume:
        model_config = ModelConfig.from_dict(json.loads((run_dir / "config.json").read_text())["model"])
        model = build_model(model_config)
        if is_old_layout(ckpt.weight_names(ckpt.latest_checkpoint(run_dir))):
            raise ValueError(f"{run_dir} was saved before attention's q, k and v became one projection: "
                             "its weights load for grr eval, grr caption and finetune --from, but its optimizer "
                             "state cannot resume; fine-tune from it (--from) instead")
    elif cfg.recipe == "finetune":
        model, info = ckpt.load_model(cfg.init_from, dropout=cfg.dropout)
        model_config = info["model_config"]
        check_same_tokenizer(info.get("tokenizer"), data, f"--from {cfg.init_from}", cfg.allow_other_tokenizer)
    else:
        special = data.special
        model_config = get_config(cfg.preset, dropout=cfg.dropout, vocab_size=special.vocab_size,
                                  pad_id=special.pad, eos_id=special.eos)
        model = build_model(model_config)
    check_model_fits_data(model_config, data)
    return model, model_config
