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

from grr_data.format.layout import CLS_INDEX, CONTEXT_LENGTH
from grr_data.format.manifest import Manifest
from grr_data.infra.procs import usable_cores
from grr_data.loader import LoaderBase, make_loader
from grr_train.model import ModelConfig, build_model, get_config
from grr_train.model.compat import is_old_layout
from grr_train.model.config import preset_of
from grr_train.runs import checkpoint as ckpt
from grr_train.runs import weights
from grr_train.runtime.parallel import resolve_compile
from grr_train.train.config import TRIM_NEEDS_EAGER, TrainConfig
from grr_train.train.plan import BatchPlan, micro_batch_for


def check_model_fits_data(model_config: ModelConfig, data: Manifest) -> None:
    """Raise ValueError listing every layout constant on which the model and the data disagree."""
    special = data.special
    pairs = {"vocab_size": (model_config.vocab_size, special.vocab_size),
             "pad_id": (model_config.pad_id, special.pad), "eos_id": (model_config.eos_id, special.eos),
             "context_length": (model_config.context_length, CONTEXT_LENGTH),
             "cls_index": (model_config.cls_index, CLS_INDEX)}
    wrong = [f"{name} {ours} (model) vs {theirs} (data)" for name, (ours, theirs) in pairs.items() if ours != theirs]
    if wrong:
        raise ValueError(f"the model does not fit {data.path}: " + "; ".join(wrong))


def check_same_tokenizer(recorded: dict | None, data: Manifest, whose: str, allow_other: bool = False) -> None:
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
        f"{data.path} was sharded with {ours.get('name')!r} ({_describe(ours)}): the same ids would "
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
    (per-block compiles take trimmed lengths in buckets: grr_train/runtime/parallel.py's TRIM_BUCKET)."""
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


def fit_batches_to_data(cfg: TrainConfig, data: Manifest, world_size: int) -> tuple[TrainConfig, str | None]:
    """`cfg` with batches no larger than the splits hold, and a one-line warning saying what changed.

    The paper's batches (global 768, contrastive 192 pairs, validation chunks of 192) are for
    CC12M; on a small set they would make no whole step or a NaN validation loss. The contrastive
    batch is capped at the train split (a multiple of the processes), the global batch at the
    split and to a multiple of the contrastive batch, the validation chunk at the val split.
    """
    num_train = data.split_sizes.get("train", 0)
    num_val = data.split_sizes.get(cfg.val_split, 0)
    changes: dict = {}
    micro = micro_batch_for(cfg, world_size)
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
        f"warning: {data.path} has {num_train} train and {num_val} {cfg.val_split} pairs, fewer than the "
        f"batches asked for ({was}; the paper's are global 768, contrastive 192, validation chunks 192): "
        f"using {now}")


# A global batch this large on a CPU is the paper's GPU recipe run where it cannot go fast.
CPU_BATCH_WARNING = 256


def setting_warnings(cfg: TrainConfig, plan: BatchPlan, device: torch.device, total_steps: int) -> list[str]:
    """One-line warnings about settings that run but are unlikely to be what was meant."""
    out = []
    if cfg.warmup_steps > total_steps > 0:
        peak = cfg.lr_max * total_steps / cfg.warmup_steps
        out.append(f"warning: warmup_steps {cfg.warmup_steps} is longer than the run's {total_steps} steps: the "
                   f"learning rate peaks at {peak:.3g}, never reaching lr_max {cfg.lr_max:g}; set "
                   f"--set warmup_steps={max(1, total_steps // 10)} (a tenth of the run) or train longer")
    if device.type == "cpu" and plan.global_batch >= CPU_BATCH_WARNING:
        out.append(f"warning: a global batch of {plan.global_batch} on a CPU (the paper's GPU recipe): every step "
                   f"computes all {plan.global_batch} samples, so steps are slow; to try things out set "
                   "--set global_batch_size=32 --set contrastive_batch_size=32 (grr demo's batch), or train on a GPU")
    return out


def default_num_workers(world_size_on_node: int = 1) -> int:
    """CPU loader workers when none are set: this process's share of the cores, less one, at most 8."""
    return max(0, min(8, usable_cores() // max(world_size_on_node, 1) - 1))


def make_loaders(cfg: TrainConfig, data: Manifest, plan: BatchPlan, rank: int, device: torch.device,
                 autocast: torch.dtype | None) -> tuple[LoaderBase, LoaderBase | None]:
    """The run's train loader (this rank's micro-batches; an epoch a whole number of optimizer
    steps) and its validation loader (None when the set has no val split, which early stopping
    refuses)."""
    # Under bf16 autocast the patch-embedding conv casts its input to bf16 anyway; float16
    # images (more precise than bf16, range ample for normalised pixels) halve what the
    # loader buffers on the GPU. CPU runs keep float32, so their results do not change.
    gpu_bf16 = device.type == "cuda" and autocast == torch.bfloat16
    workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    common = dict(kind=cfg.loader, rank=rank, world_size=plan.world_size, seed=cfg.seed, num_workers=workers,
                  device=str(device), dtype=torch.float16 if gpu_bf16 else torch.float32)
    # A step takes all its micro-batches before any GPU work (it needs their token count), so the
    # loader must work at least that far ahead or the GPU waits on decoding.
    train = make_loader(data, split="train", batch_size=plan.micro_batch, shuffle=True,
                        prefetch=plan.accumulation + 1, batch_multiple=plan.accumulation, **common)
    if data.split_sizes.get(cfg.val_split, 0) > 0:  # fit_batches_to_data capped its contrastive chunk: no NaN
        return train, make_loader(data, split=cfg.val_split, batch_size=cfg.val_batch_size, shuffle=False, **common)
    if cfg.early_stop:
        raise ValueError(f"{data.path}: no {cfg.val_split!r} split, which early stopping needs")
    return train, None


def build_run_model(cfg: TrainConfig, run_dir: Path, data: Manifest,
                    resume: bool) -> tuple[torch.nn.Module, ModelConfig, TrainConfig]:
    """(model, its config, `cfg`) for a run: the run's own config on resume, the --from checkpoint's
    for fine-tuning (and `cfg` then names its preset, which the run records), else the preset sized
    to the data's vocabulary and special ids; checked against the data's layout and tokenizer."""
    if resume:
        model_config = ModelConfig.from_dict(json.loads((run_dir / "config.json").read_text())["model"])
        model = build_model(model_config)
        if is_old_layout(weights.weight_names(ckpt.latest_checkpoint(run_dir))):
            raise ValueError(f"{run_dir} was saved before attention's q, k and v became one projection: "
                             "its weights load for grr eval, grr caption and finetune --from, but its optimizer "
                             "state cannot resume; fine-tune from it (--from) instead")
    elif cfg.recipe == "finetune":
        model, info = weights.load_model(cfg.init_from, dropout=cfg.dropout)
        model_config = info["model_config"]
        check_same_tokenizer(info.get("tokenizer"), data, f"--from {cfg.init_from}", cfg.allow_other_tokenizer)
        # The model is --from's, whatever `preset` says (its default): record the preset it is.
        preset = preset_of(model_config) or info["train_config"].get("preset") or cfg.preset
        cfg = dataclasses.replace(cfg, preset=preset)
    else:
        special = data.special
        model_config = get_config(cfg.preset, dropout=cfg.dropout, vocab_size=special.vocab_size,
                                  pad_id=special.pad, eos_id=special.eos)
        model = build_model(model_config)
    check_model_fits_data(model_config, data)
    return model, model_config, cfg
