"""The fixed-seed loss curve: the run that makes it, how it is stored, and how two curves compare.

The run is `grr-tiny` on CPU in fp32 with dropout at its preset value (0.15), on 32 real
photo crops made by `shardset.make_shardset` (seed 0): 4 images per micro-batch, 2 micro-batches
per optimizer step (so gradient accumulation is in the maths), 4 steps per epoch, 4 epochs
(16 steps: warm-up, the cosine cycle and its restarts, a reshuffle every epoch). No validation:
it does not touch the training RNG or weights, and leaving it out keeps the run short.

`tests/test_train_curve.py` reruns this and compares it with `tests/data/loss_curve_grr_tiny.json`;
`scripts/record_loss_curve.py` rewrites that file (only when the maths is meant to change).
"""

from __future__ import annotations

import platform
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL
import torch

from grr_train.runs.metrics import read_metrics
from grr_train.train.config import TrainConfig
from grr_train.train.trainer import run_training

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

CURVE_PATH = Path(__file__).parent / "data" / "loss_curve_grr_tiny.json"
LOSS_KEYS = ("loss", "contrastive", "caption")

# The data: one split, two shards of 16 samples, from shardset's seed.
SHARD_SIZES = (16, 16)
DATA_SEED = 0
# Every TrainConfig field the curve depends on is pinned here, so a change of recipe defaults
# cannot move the curve silently; dropout stays at the pretraining (and grr-tiny) value.
SETTINGS = dict(
    recipe="pretrain", preset="grr-tiny", seed=0, global_batch_size=8, per_device_batch_size=4, epochs=4,
    max_steps=None, lambda_con=2.0, lambda_cap=1.0, dropout=0.15, lr_max=1e-3, lr_min=1e-4, warmup_steps=2,
    beta1=0.9, beta2=0.999, weight_decay=0.001, grad_clip=1.0, early_stop=False, val_every=0,
    val_split="none", checkpoint_every=1000, keep_checkpoints=1, loader="cpu", num_workers=0,
    precision="fp32", compile="off", skip_nonfinite=False, tensorboard=False,
)
NUM_THREADS = 1  # intra-op threads: fixed so the reduction order does not follow the machine's cores


def make_curve_data(root: Path) -> Path:
    return make_shardset(root, shard_sizes=SHARD_SIZES, split="train", seed=DATA_SEED)


def run_curve(data: Path, run_dir: Path, **overrides) -> dict[str, list[float]]:
    """Train with SETTINGS (changed by `overrides`, e.g. a perturbation); {loss key: per-step values}."""
    cfg = replace(TrainConfig(), **{**SETTINGS, **overrides}, data=str(data))
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
    return {key: [r[key] for r in records] for key in LOSS_KEYS}


def provenance() -> dict:
    """How the stored curve was made: enough to rerun it and to judge a mismatch."""
    return {
        "torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "num_threads": NUM_THREADS,
        "data": {"maker": "tests/shardset.py make_shardset", "shard_sizes": list(SHARD_SIZES),
                 "seed": DATA_SEED, "split": "train"},
        "settings": SETTINGS,
    }


def compare(actual: dict[str, list[float]], expected: dict[str, list[float]], rtol: float) -> list[str]:
    """Every (key, step) where `actual` is off `expected` by more than rtol * |expected|; [] if none."""
    problems = []
    for key in LOSS_KEYS:
        a, e = actual[key], expected[key]
        if len(a) != len(e):
            problems.append(f"{key}: {len(a)} steps, expected {len(e)}")
            continue
        for step, (x, y) in enumerate(zip(a, e, strict=True), start=1):
            if not abs(x - y) <= rtol * abs(y):  # `not <=` also catches NaN
                problems.append(f"{key} step {step}: {x!r} vs expected {y!r} (rel. diff {abs(x - y) / abs(y):.2e})")
    return problems
