"""`grr train pretrain --auto-resume` through the CLI on a tiny run: it starts a run where there is
none, resumes one that holds a checkpoint (the same losses as an unbroken run), and starts fresh,
with a note, in a folder left by a run that died before its first save; an explicit --resume there is
still refused; fine-tuning resumes with the same DATASET and --from and refuses another --from."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grr_cli.main import app
from grr_train.runs.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

# 12 train samples, 2 per micro-batch, 2 micro-batches per step: 3 steps per epoch (tests/test_train.py's tiny).
TINY = ["preset=grr-tiny", "per_device_batch_size=2", "global_batch_size=4", "warmup_steps=2", "lr_max=1e-3",
        "lr_min=1e-4", "num_workers=0", "loader=cpu", "val_batch_size=4", "val_contrastive_batch_size=2",
        "checkpoint_every=2", "keep_checkpoints=2", "epochs=2", "tensorboard=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_shardset(root, shard_sizes=(4,), split="val", seed=1)
    val = json.loads((root / "manifest.json").read_text())["splits"]["val"]
    make_shardset(root, shard_sizes=(6, 6), split="train", seed=0)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["val"] = val
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def done(data, tmp_path_factory) -> Path:
    """A one-step run: its config.json is what a run writes before its first step."""
    run = tmp_path_factory.mktemp("done") / "run"
    pretrain(data, run, 1)
    return run


def invoke(data: Path, out: Path, max_steps: int, *flags: str):
    sets = [a for s in TINY for a in ("--set", s)]
    return CliRunner().invoke(app, ["train", "pretrain", "--data", str(data), "--out", str(out),
                                    "--max-steps", str(max_steps), *sets, *flags])


def pretrain(data: Path, out: Path, max_steps: int, *flags: str) -> tuple[dict, str]:
    """The run's summary and what it wrote on stderr."""
    result = invoke(data, out, max_steps, *flags)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run, "train")]


def test_auto_resume_starts_then_resumes_exactly(tmp_path, data):
    full, _ = pretrain(data, tmp_path / "full", 4)
    first, err = pretrain(data, tmp_path / "run", 2, "--auto-resume")  # no folder yet: a new run
    assert first["step"] == 2 and "auto-resume" not in err
    second, err = pretrain(data, tmp_path / "run", 4, "--auto-resume")  # the same line, later: resumes
    assert second["step"] == 4 and full["step"] == 4
    assert f"auto-resume: {tmp_path / 'run'} holds a checkpoint; resuming" in err
    assert losses(tmp_path / "run") == losses(tmp_path / "full")  # exact: it continued, not restarted


def test_auto_resume_starts_fresh_after_a_run_that_never_saved(tmp_path, data, done):
    dead = tmp_path / "dead"
    dead.mkdir()
    shutil.copy(done / "config.json", dead / "config.json")  # a run that died before its first save
    summary, err = pretrain(data, dead, 1, "--auto-resume")
    assert summary["step"] == 1
    assert f"note: auto-resume: {dead} has a config.json but no checkpoint" in err and "starting fresh" in err
    assert losses(dead) == losses(done)


def test_resume_without_a_checkpoint_is_still_refused(tmp_path, data, done):
    dead = tmp_path / "dead"
    dead.mkdir()
    shutil.copy(done / "config.json", dead / "config.json")
    result = invoke(data, dead, 1, "--resume")  # an explicit --resume keeps the trainer's rule
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: --resume: {dead} has no checkpoint to resume from"


def test_finetune_auto_resume_keeps_its_from_and_refuses_another(tmp_path, data, done):
    sets = [a for s in TINY if not s.startswith("preset=") for a in ("--set", s)]

    def finetune(max_steps: int, source: Path):
        return CliRunner().invoke(app, ["train", "finetune", "roco", "--from", str(source), "--data", str(data),
                                        "--out", str(tmp_path / "fine"), "--max-steps", str(max_steps), *sets,
                                        "--auto-resume"])

    first = finetune(1, done)
    assert first.exit_code == 0, first.output
    second = finetune(2, done)  # the same command line with DATASET and --from: they match the run's
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout.strip().splitlines()[-1])["step"] == 2 and "resuming" in second.stderr
    other = finetune(3, tmp_path)
    assert other.exit_code == 1 and "cannot change init_from" in other.stderr
