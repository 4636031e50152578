"""The fixed-seed training curves: the runs that make them, how they are stored, and how two compare.

Two runs on CPU in fp32, with dropout at its preset value (0.15), on 32 real photo crops made by
`shardset.make_shardset` (seed 0): 4 images per micro-batch, 2 micro-batches per optimizer step (so
gradient accumulation is in the maths), 4 steps per epoch.

- `grr-tiny`, 4 epochs (16 steps: warm-up, the cosine cycle and its restarts, a reshuffle every
  epoch), with a caption weight other than 1 (lambda_con 1.6, lambda_cap 0.7) and a weight decay
  large enough to show in the losses (0.3: dropping it moves them well past the strict tolerance);
- `baseline-tiny`, the first 6 of the same steps (the baseline's LayerNorm, MLP and sin-cos tower).

Each step's loss, contrastive and caption losses, gradient norm (before clipping) and learning rate
are stored. No validation: it does not touch the training RNG or weights, and leaving it out keeps
the runs short. `tests/test_train_curve.py` reruns them and compares with `CURVE_PATHS`;
`scripts/record_loss_curve.py` rewrites those files (only when the maths is meant to change).
"""

from __future__ import annotations

import platform
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import PIL
import torch

from grr_train.runs.metrics import read_metrics
from grr_train.train.config import TrainConfig
from grr_train.train.trainer import run_training

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

DATA_DIR = Path(__file__).parent / "data"
# preset -> (its stored curve, the optimizer steps it runs)
CURVES = {"grr-tiny": (DATA_DIR / "loss_curve_grr_tiny.json", None),
          "baseline-tiny": (DATA_DIR / "loss_curve_baseline_tiny.json", 6)}
KEYS = ("loss", "contrastive", "caption", "grad_norm", "lr")

# The data: one split, two shards of 16 samples, from shardset's seed.
SHARD_SIZES = (16, 16)
DATA_SEED = 0
# Every TrainConfig field but `data` (the test's folder) is pinned here, so a change of a recipe
# default cannot move the curves silently; tests/test_train_curve.py fails when a new field is not
# listed. `preset` and `max_steps` are those of the grr-tiny curve (CURVES gives each run's).
SETTINGS = dict(
    recipe="pretrain", preset="grr-tiny", dataset=None, init_from=None, seed=0,
    global_batch_size=8, contrastive_batch_size=192, per_device_batch_size=4, epochs=4, max_steps=None,
    lambda_con=1.6, lambda_cap=0.7, dropout=0.15,
    lr_max=1e-3, lr_min=1e-4, warmup_steps=2, lr_cycle_steps=None, beta1=0.9, beta2=0.999, weight_decay=0.3,
    grad_clip=1.0,
    early_stop=False, patience_per_level=3, num_lr_levels=3, lr_reduction=100.0,
    val_every=0, val_split="none", val_batch_size=48, val_contrastive_batch_size=192,
    checkpoint_every=1000, keep_checkpoints=1,
    loader="cpu", process_group_timeout_minutes=None, num_workers=0, precision="fp32", compile="off",
    activation_checkpointing=False, trim_text_padding=False, parallelism="ddp",
    skip_nonfinite=False, max_skipped_fraction=0.05, break_lock=False, allow_other_tokenizer=False,
    tensorboard=False, log_every=50, log_every_s=30.0, wandb_project=None, wandb_entity=None, wandb_mode=None,
    aligned_widths="auto", fused_caption_loss="auto", clip_in_optimizer="auto", inductor_random="default",
    micro_batch_groups=1,
)
NUM_THREADS = 1  # intra-op threads: fixed so the reduction order does not follow the machine's cores


def unpinned_fields() -> set[str]:
    """TrainConfig fields SETTINGS does not name (should be none)."""
    return {f.name for f in fields(TrainConfig)} - {"data"} - set(SETTINGS)


def make_curve_data(root: Path) -> Path:
    return make_shardset(root, shard_sizes=SHARD_SIZES, split="train", seed=DATA_SEED)


def run_curve(data: Path, run_dir: Path, preset: str = "grr-tiny", **overrides) -> dict[str, list[float]]:
    """Train `preset`'s curve with SETTINGS (changed by `overrides`, e.g. a perturbation);
    {key: per-step values} for KEYS."""
    max_steps = CURVES[preset][1]
    cfg = replace(TrainConfig(), **{**SETTINGS, "preset": preset, "max_steps": max_steps, **overrides},
                  data=str(data))
    threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    try:
        run_training(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)
    records = read_metrics(run_dir, "train")
    steps = [r["step"] for r in records]
    if steps != list(range(1, len(steps) + 1)):
        raise AssertionError(f"{run_dir}/metrics.jsonl: train steps {steps} are not 1..N")
    return {key: [r[key] for r in records] for key in KEYS}


def torch_build() -> dict:
    """The torch build a curve depends on: its base version and kind (cpu, cuda, rocm). Local
    version labels (`+cpu`, `+cu128`) and a CUDA build's own version string do not change the CPU
    kernels a CPU run uses; the kind says which build family it is."""
    kind = "cuda" if torch.version.cuda else "rocm" if getattr(torch.version, "hip", None) else "cpu"
    return {"torch_base": torch.__version__.split("+")[0], "torch_build": kind}


def provenance(preset: str = "grr-tiny") -> dict:
    """How a stored curve was made: enough to rerun it and to judge a mismatch."""
    return {
        "torch": torch.__version__, **torch_build(), "numpy": np.__version__, "pillow": PIL.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "num_threads": NUM_THREADS,
        "data": {"maker": "tests/shardset.py make_shardset", "shard_sizes": list(SHARD_SIZES),
                 "seed": DATA_SEED, "split": "train"},
        "preset": preset, "max_steps": CURVES[preset][1],
        "settings": SETTINGS,
    }


def compare(actual: dict[str, list[float]], expected: dict[str, list[float]], rtol: float) -> list[str]:
    """Every (key, step) where `actual` is off `expected` by more than rtol * |expected|; [] if none."""
    problems = []
    for key in KEYS:
        a, e = actual[key], expected[key]
        if len(a) != len(e):
            problems.append(f"{key}: {len(a)} steps, expected {len(e)}")
            continue
        for step, (x, y) in enumerate(zip(a, e, strict=True), start=1):
            if not abs(x - y) <= rtol * abs(y):  # `not <=` also catches NaN
                problems.append(f"{key} step {step}: {x!r} vs expected {y!r} (rel. diff {abs(x - y) / abs(y):.2e})")
    return problems
