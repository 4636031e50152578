"""A tiny trained run whose set was sharded with a real tokenizer in a folder of its own, for the
tests of a run's tokenizer copy, `grr export` and the Python API (test_api.py, test_export.py).

The trainer copies the tokenizer into the run once grr_train/train/trainer.py calls `copy_tokenizer`;
`train_tiny_run` makes the copy itself as the trainer's first step would, so these tests do not
depend on that wiring (test_api.py has a test of the wiring itself).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_shard import jpeg, make_fetch_output  # noqa: E402  (sets HF_HUB_OFFLINE=1)

from grr_data.shard.run import shard_dataset  # noqa: E402
from grr_data.tokenizer import SAMPLE_TOKENIZER_DIR  # noqa: E402
from grr_train.train.config import TrainConfig  # noqa: E402
from grr_train.train.trainer import run_training  # noqa: E402


def make_set(root: Path) -> tuple[Path, Path]:
    """(a sharded set with a train split of 8 samples, the tokenizer folder it was sharded with)."""
    tokenizer = root / "my-tokenizer"
    shutil.copytree(SAMPLE_TOKENIZER_DIR, tokenizer)
    make_fetch_output(root / "in", num_tars=1, per_tar=8, split_folder="train")
    shard_dataset(root / "in", root / "data", tokenizer=str(tokenizer), progress=False, workers=1)
    return root / "data", tokenizer


def tiny_config(data: Path, steps: int = 1) -> TrainConfig:
    """`steps` optimizer steps of grr-tiny on `data`, CPU, no validation."""
    return replace(TrainConfig(), preset="grr-tiny", data=str(data), per_device_batch_size=4, global_batch_size=4,
                   warmup_steps=1, lr_max=1e-3, lr_min=1e-4, num_workers=0, loader="cpu", val_split="none",
                   checkpoint_every=1, keep_checkpoints=1, epochs=1, max_steps=steps, tensorboard=False)


def train_tiny_run(data: Path, run: Path, steps: int = 1) -> Path:
    """A tiny run (`tiny_config`) with the set's tokenizer copied into it."""
    run_training(tiny_config(data, steps), run)
    copy_into_run(run, data)
    return run


def copy_into_run(run: Path, data: Path) -> None:
    """What the trainer does at a run's start: copy the set's tokenizer into the run."""
    from grr_data.format.manifest import Manifest
    from grr_train.runs.tokenizer import copy_tokenizer

    if not (run / "tokenizer").is_dir():
        copy_tokenizer(run, Manifest.read(data).tokenizer.to_dict())


def photos(folder: Path, count: int = 3) -> list[Path]:
    """`count` small distinct JPEG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"photo{i}.jpg")
        paths[-1].write_bytes(jpeg(100 + i, size=(320, 240)))
    return paths


def train_validated_run(data: Path, run: Path, steps: int = 2) -> Path:
    """`train_tiny_run`, validated on the train split (8 samples) at its last step, so its
    metrics.jsonl has validation figures (a model card shows them)."""
    cfg = replace(tiny_config(data, steps), val_split="train", val_every=steps, val_batch_size=4,
                  val_contrastive_batch_size=4)
    run_training(cfg, run)
    copy_into_run(run, data)
    return run
