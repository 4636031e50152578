"""Fault injection through the trainer (issue 10 items 2, 9, 10; issue 24): a damaged newest
checkpoint, a torn last line in metrics.jsonl, a full disk and a stop that lands during validation,
each met by a real tiny run (grr-tiny, CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grr_train.runs.metrics import read_metrics
from grr_train.train.settings import resume_config
from grr_train.train.trainer import run_training

sys.path.insert(0, str(Path(__file__).parent))
from test_faults_checkpoint import flip_byte, run_on_small_tmpfs, weights_data_offset  # noqa: E402
from test_train import make_data, tiny, train_losses  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

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


# ---- a stop that lands during validation (issue 24) ------------------------------------------------

VOLATILE = ("time", "samples_per_s", "mfu")  # what two runs of the same steps may differ in


def comparable_records(run: Path) -> list[dict]:
    """metrics.jsonl without times and without the `stop` events of the interruptions (a signal, a
    resume told to end at max_steps): what an interrupted and resumed run must log exactly as an
    unbroken run does."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run)
            if not (r["kind"] == "event" and r["what"] == "stop" and r["reason"] in ("signal", "max_steps"))]


def stop_during_validation(monkeypatch, nth: int) -> list[int]:
    """SIGTERM to this process between the first and second batch of the `nth` validation (as Slurm
    or `timeout` would send it); returns the steps at which validations started."""
    import grr_train.train.trainer as trainer

    real_validate, started = trainer.validate, []

    def signalling(loader):
        for i, batch in enumerate(loader):
            yield batch
            if i == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    def validating(model, loader, *args, **kwargs):
        started.append(len(started) + 1)
        return real_validate(model, signalling(loader) if len(started) == nth else loader, *args, **kwargs)

    monkeypatch.setattr(trainer, "validate", validating)
    return started


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("val_data"), (6, 6), (4,))  # 3 steps an epoch; val in 2 batches


@pytest.mark.parametrize("hops", [(), (4,)], ids=["resume", "resume-to-the-stop-then-on"])
def test_a_stop_during_a_val_every_validation_is_redone_on_resume(tmp_path, val_data, monkeypatch, hops):
    """Old code: the checkpoint of step 4 was saved as if step 4 were validated, and the resumed run
    went on to step 5: the val record of step 4 was missing. `hops`: a resume that ends at the stop's
    step (it validates and stops), then one to the end; the step is validated once, not twice."""
    cfg = tiny(val_data, dropout=0.15, val_every=2, checkpoint_every=100, epochs=2, val_batch_size=2)  # val at 2, 3, 4, 6
    run_training(cfg, tmp_path / "full")
    stop_during_validation(monkeypatch, nth=3)  # the val_every validation of step 4
    summary = run_training(cfg, tmp_path / "part")
    assert summary["stop_reason"] == "signal" and summary["step"] == 4, summary
    assert [r["step"] for r in read_metrics(tmp_path / "part", "val")] == [2, 3]
    monkeypatch.undo()
    for step in (*hops, None):
        resumed = run_training(resume_config(tmp_path / "part", max_steps=step), tmp_path / "part", resume=True)
        assert resumed["stop_reason"] == ("max_steps" if step else "epochs"), resumed
    assert comparable_records(tmp_path / "part") == comparable_records(tmp_path / "full")
    assert [r["step"] for r in read_metrics(tmp_path / "part", "val")] == [2, 3, 4, 6]


def test_an_epoch_end_validation_stopped_in_finetuning_decides_once_on_resume(tmp_path, val_data, monkeypatch):
    """The epoch-end validation of epoch 2 is cut short: on resume it is redone and early stopping
    decides on it exactly once, as in an unbroken run (this path already held before issue 24; the
    test keeps it so)."""
    pre = tmp_path / "pre"
    run_training(tiny(val_data, max_steps=1, val_split="none"), pre)
    cfg = tiny(val_data, recipe="finetune", init_from=str(pre), dataset="test", lr_max=2e-3, lr_min=1e-4,
               warmup_steps=0, early_stop=True, patience_per_level=1, num_lr_levels=2, epochs=4, dropout=0.1,
               val_every=2, checkpoint_every=100, val_batch_size=2)
    full = run_training(cfg, tmp_path / "full")
    stop_during_validation(monkeypatch, nth=4)  # steps 2, 3 (epoch end), 4, 6 (epoch end): the 4th
    summary = run_training(cfg, tmp_path / "part")
    assert summary["stop_reason"] == "signal" and summary["step"] == 6 and summary["epoch"] == 1, summary
    monkeypatch.undo()
    resumed = run_training(resume_config(tmp_path / "part"), tmp_path / "part", resume=True)
    assert resumed["stop_reason"] == full["stop_reason"] and resumed["step"] == full["step"]
    assert comparable_records(tmp_path / "part") == comparable_records(tmp_path / "full")
    decisions = [r["step"] for r in read_metrics(tmp_path / "part", "event") if r["what"].startswith("early_stop_")]
    assert decisions == [3 * e for e in range(1, len(decisions) + 1)] and 6 in decisions


# Installed as sitecustomize in the training processes torchrun starts (LOCAL_RANK set): during the
# STOP_AT-th validation, after its first batch, rank 0 says "validating" in a file and every rank
# waits until the stop signal has reached it (the trainer's handler gives way to the previous one).
STOP_HOOK = """
import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("STOP_AT"):
    import signal, time
    import grr_train.train.validate as module
    real, started = module.validate, []

    def signalling(loader):
        for i, batch in enumerate(loader):
            yield batch
            if i == 0:
                catching = signal.getsignal(signal.SIGTERM)
                if os.environ["RANK"] == "0":
                    open(os.environ["MARKER"], "w").close()
                deadline = time.monotonic() + 120
                while signal.getsignal(signal.SIGTERM) == catching and time.monotonic() < deadline:
                    time.sleep(0.05)

    def validate(model, loader, *args, **kwargs):
        started.append(1)
        stop = len(started) == int(os.environ["STOP_AT"])
        return real(model, signalling(loader) if stop else loader, *args, **kwargs)

    module.validate = validate
"""


def test_a_stop_during_validation_under_torchrun_is_redone_on_resume(tmp_path, val_data):
    """SIGTERM to the process group (what Slurm sends) while 2 gloo processes validate at a val_every
    step. Old code: exit 0, but the resumed run's metrics lacked that step's val record."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_HOOK)
    marker = tmp_path / "validating"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "MARKER": str(marker)}

    def command(out: Path, resume: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "grr_cli.main", "train", "pretrain", "--preset", "grr-tiny", "--data",
               str(val_data), "--out", str(out), "--nproc-per-node", "2"] + (["--resume"] if resume else [])
        for s in ("per_device_batch_size=1", "global_batch_size=4", "dropout=0.15", "num_workers=0", "loader=cpu",
                  "tensorboard=false", "epochs=2", "val_every=2", "checkpoint_every=100", "val_batch_size=1",
                  "val_contrastive_batch_size=2", "warmup_steps=2"):
            cmd += ["--set", s]
        return cmd

    def finish(cmd: list[str]) -> None:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    finish(command(tmp_path / "full"))
    proc = subprocess.Popen(command(tmp_path / "part"), cwd=ROOT, env={**env, "STOP_AT": "3"},  # step 4's
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.communicate(timeout=60)[1][-3000:] if proc.poll() is not None else "no marker"
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "part", "val")] == [2, 3]
    finish(command(tmp_path / "part", resume=True))
    assert comparable_records(tmp_path / "part") == comparable_records(tmp_path / "full")
    assert [r["step"] for r in read_metrics(tmp_path / "part", "val")] == [2, 3, 4, 6]
