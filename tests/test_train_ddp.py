"""Two gloo processes (`--nproc-per-node 2`) against one process at the same global batch.

The loader plan gives global step s the same samples whatever the world size, the contrastive
negatives are gathered across ranks and the caption loss is normalised by the global token
count, so with dropout off the two runs compute the same losses and gradients up to float
summation order. Tolerance: 1e-4 relative on loss and gradient norm over 3 steps. Also: a stop
signal to the whole process group of a 2-process run ends in a checkpoint and exit 0.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from grr_train.runs.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # subprocesses under torchrun: tens of seconds each


def run_cli(data: Path, out: Path, nproc: int, per_device: int) -> None:
    cmd = [sys.executable, "-m", "grr_cli.main", "train", "pretrain", "--preset", "grr-tiny", "--data", str(data),
           "--out", str(out), "--max-steps", "3", "--nproc-per-node", str(nproc)]
    for s in (f"per_device_batch_size={per_device}", "global_batch_size=4", "dropout=0", "num_workers=0",
              "loader=cpu", "warmup_steps=0", "lr_max=1e-3", "lr_min=1e-3", "tensorboard=false",
              "val_contrastive_batch_size=2", "val_batch_size=2"):
        cmd += ["--set", s]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one(tmp_path):
    data = make_data(tmp_path / "data", (12,), (4,))
    run_cli(data, tmp_path / "one", nproc=1, per_device=4)
    run_cli(data, tmp_path / "two", nproc=2, per_device=2)
    one, two = read_metrics(tmp_path / "one", "train"), read_metrics(tmp_path / "two", "train")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "contrastive", "caption", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    val_one, val_two = read_metrics(tmp_path / "one", "val"), read_metrics(tmp_path / "two", "val")
    assert val_two[0]["num_samples"] == val_one[0]["num_samples"] == 4
    assert val_two[0]["loss"] == pytest.approx(val_one[0]["loss"], rel=1e-4)
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000003"
    assert (ckpt / "model.safetensors").exists()  # rank 0 wrote it


def test_two_processes_with_accumulation_match_one(tmp_path):
    # 2 micro-batches per step: DDP's no_sync on the first, the all-reduce on the second. The
    # contrastive batch is 2 pairs in both runs (1 per process x 2, or 2 x 1), from the same samples.
    data = make_data(tmp_path / "data", (12,), (4,))
    run_cli(data, tmp_path / "one", nproc=1, per_device=2)
    run_cli(data, tmp_path / "two", nproc=2, per_device=1)
    one, two = read_metrics(tmp_path / "one", "train"), read_metrics(tmp_path / "two", "train")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "contrastive", "caption", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,num_workers", [(2, 0), (2, 1), (1, 1)])
def test_sigterm_to_the_process_group_saves_and_exits_0(tmp_path, nproc, num_workers):
    # What Slurm, Kubernetes and `timeout` do: SIGTERM to every process of the job's group,
    # the launcher, torchrun, the trainers and their loader workers alike.
    import os
    import signal
    import time

    data = make_data(tmp_path / "data", (12,), (4,))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "grr_cli.main", "train", "pretrain", "--preset", "grr-tiny", "--data", str(data),
           "--out", str(run), "--nproc-per-node", str(nproc)]
    for s in (f"per_device_batch_size={2 // nproc}", "global_batch_size=2", f"num_workers={num_workers}", "loader=cpu",
              "tensorboard=false", "epochs=1000", "val_split=none", "checkpoint_every=100000"):
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stops = [r for r in read_metrics(run, "event") if r.get("what") == "stop"]
    assert stops and stops[-1]["reason"] == "signal"
    assert (run / "checkpoints" / "latest").exists()


def test_a_run_saved_by_two_processes_resumes_on_one(tmp_path):
    # The contrastive batch (2) holds whatever the world size, so the plan's order is the same and
    # the epoch continues at the same sample; with dropout off the resumed run matches an
    # uninterrupted one-process run up to float summation order.
    data = make_data(tmp_path / "data", (12,), (4,))
    common = ["--preset", "grr-tiny", "--data", str(data)]
    for s in ("contrastive_batch_size=2", "global_batch_size=4", "dropout=0", "num_workers=0", "loader=cpu",
              "warmup_steps=0", "lr_max=1e-3", "lr_min=1e-3", "tensorboard=false", "val_split=none",
              "checkpoint_every=2"):
        common += ["--set", s]

    def train(out, nproc, steps, resume=False):
        cmd = [sys.executable, "-m", "grr_cli.main", "train", "pretrain", *common, "--out", str(out),
               "--max-steps", str(steps), "--nproc-per-node", str(nproc)] + (["--resume"] if resume else [])
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    train(tmp_path / "straight", 1, 4)
    train(tmp_path / "moved", 2, 2)
    done = train(tmp_path / "moved", 1, 4, resume=True)
    assert "saved by 2 processes and resumes on 1" in done.stdout + done.stderr
    straight, moved = read_metrics(tmp_path / "straight", "train"), read_metrics(tmp_path / "moved", "train")
    assert [r["step"] for r in moved] == [1, 2, 3, 4]
    for a, b in zip(straight, moved, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    events = [r for r in read_metrics(tmp_path / "moved", "event") if r.get("what") == "resume_world_size"]
    assert events and events[0]["same_order"] and events[0]["saved_world_size"] == 2
