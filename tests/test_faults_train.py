"""Fault injection through the trainer (issue 10 items 2, 9, 10): a damaged newest checkpoint, a torn
last line in metrics.jsonl and a full disk, each met by a real tiny run (grr-tiny, CPU)."""

import sys
from pathlib import Path

import pytest

from grr_train.train.config import resume_config
from grr_train.train.trainer import run_training

sys.path.insert(0, str(Path(__file__).parent))
from test_faults_checkpoint import flip_byte, run_on_small_tmpfs, weights_data_offset  # noqa: E402
from test_train import make_data, tiny, train_losses  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), (4,))


def four_steps(data: Path, run: Path):
    """4 steps (one an epoch), checkpoints kept at 3 and 4; returns the cfg and the losses logged."""
    cfg = tiny(data, per_device_batch_size=4, max_steps=4, epochs=10, val_split="none", dropout=0.1)
    run_training(cfg, run)
    return cfg, train_losses(run)


def test_resume_skips_a_damaged_newest_checkpoint_and_repeats_the_same_steps(tmp_path, data, capsys):
    run = tmp_path / "run"
    _, losses = four_steps(data, run)
    older, newest = sorted((run / "checkpoints").glob("step-*"))[-2:]
    weights = newest / "model.safetensors"
    flip_byte(weights, weights_data_offset(weights))
    capsys.readouterr()
    summary = run_training(resume_config(run, max_steps=4), run, resume=True)
    err = capsys.readouterr().err
    assert f"{weights} is damaged" in err and f"using {older.name}" in err, err[:1000]
    assert summary["step"] == 4
    assert train_losses(run) == losses  # steps 3 and 4 again, exactly as the first time


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, data, capsys):
    run = tmp_path / "run"
    _, losses = four_steps(data, run)
    torn = len((run / "metrics.jsonl").read_text().splitlines()) + 1
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "loss": 2.71')  # a crash in the middle of a record
    capsys.readouterr()
    summary = run_training(resume_config(run, max_steps=5), run, resume=True)
    assert summary["step"] == 5
    assert f"{run / 'metrics.jsonl'}:{torn}: dropping a torn last line" in capsys.readouterr().err
    assert train_losses(run)[:4] == losses and [s for s, _ in train_losses(run)] == [1, 2, 3, 4, 5]


def test_a_bad_line_inside_metrics_stops_resume_naming_it(tmp_path, data):
    run = tmp_path / "run"
    four_steps(data, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{run / 'metrics.jsonl'}:2: not a JSON line"):
        run_training(resume_config(run, max_steps=5), run, resume=True)


TRAIN_ON_A_FULL_DISK = """
    import os, sys
    os.environ["_TYPER_STANDARD_TRACEBACK"] = "1"  # a plain last line, should the error be a traceback
    from grr_cli.main import app
    sys.argv = ["grr", "train", "pretrain", "--preset", "grr-tiny", "--data", DATA, "--out", DISK + "/run",
                "--set", "per_device_batch_size=4", "--set", "global_batch_size=4", "--set", "num_workers=0",
                "--set", "loader=cpu", "--set", "max_steps=1", "--set", "checkpoint_every=1",
                "--set", "tensorboard=false", "--set", "val_split=none"]
    app()
"""


def test_a_full_disk_while_training_says_so_with_the_path(tmp_path, data):
    # 1 MB: config.json and the first metrics fit, grr-tiny's checkpoint (~5 MB) does not
    result = run_on_small_tmpfs(tmp_path, "1m", TRAIN_ON_A_FULL_DISK, DATA=str(data))
    assert result.returncode != 0
    checkpoint = tmp_path / "disk" / "run" / "checkpoints" / "step-0000001"
    last = result.stderr.strip().splitlines()[-1]  # what the user reads last, traceback or not
    assert f"No space left on device while saving the checkpoint {checkpoint}" in last, result.stderr[-3000:]
