"""Progress where output is kept (issue 22): plain lines, never carriage-return redraws, when the
stream is no terminal; a tqdm bar on one. The lines come at the first updates, then every N
updates or S seconds, with the postfix (a step's loss, lr, samples/s), the rate and the ETA; a
training run with its output in a file writes them and nothing else of the bar."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

import grr_data.infra.progress as progress_module
from grr_data.infra.progress import LineProgress, progress

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", c)
    return c


def counts(text: str) -> list[str]:
    return [line.split(" | ")[0] for line in text.splitlines()]


def test_lines_for_the_first_updates_then_every_n_then_at_close(clock, monkeypatch):
    monkeypatch.delenv("GRR_PROGRESS", raising=False)
    out = Stream(tty=False)
    bar = progress(total=12, desc="pretrain x1", unit="step", first=3, every_n=5, every_s=1e9, stream=out)
    assert isinstance(bar, LineProgress)
    for _ in range(12):
        clock.now += 1
        bar.update(1)
    bar.close()
    assert counts(out.getvalue()) == [f"pretrain x1: step {n}/12 ({p}%)" for n, p in
                                      ((1, 8), (2, 17), (3, 25), (8, 67), (12, 100))]
    assert "\r" not in out.getvalue()


def test_lines_every_s_seconds_when_updates_are_slow(clock):
    out = Stream(tty=False)
    bar = LineProgress(total=None, desc="shard", unit="pair", every_s=10.0, stream=out)
    for _ in range(9):  # one update every 4 s: a line once 10 s have passed since the last one
        clock.now += 4
        bar.update(1)
    bar.close()
    assert counts(out.getvalue()) == ["shard: pair 3", "shard: pair 6", "shard: pair 9"]


def test_a_line_holds_the_postfix_rate_and_eta(clock):
    out = Stream(tty=False)
    bar = LineProgress(total=100, desc="pretrain x1", unit="step", first=1, every_n=10, every_s=None, stream=out)
    clock.now += 5  # the first step holds warm-up: the rate is measured from it on
    bar.set_postfix({"loss": "1.2345", "lr": "2.50e-04", "samples/s": "64.0"})
    bar.update(1)
    for _ in range(10):
        clock.now += 2
        bar.update(1)
    last = out.getvalue().splitlines()[-1]
    # 10 steps in 20 s since the first: 0.5 step/s; 89 steps left -> 178 s
    assert last == ("pretrain x1: step 11/100 (11%) | loss 1.2345 lr 2.50e-04 samples/s 64.0 | "
                    "0.5 step/s, elapsed 0:00:25, ETA 0:02:58")


def test_a_terminal_gets_a_bar_and_the_setting_overrides(monkeypatch):
    monkeypatch.delenv("GRR_PROGRESS", raising=False)
    assert isinstance(progress(total=3, stream=Stream(tty=True)), tqdm)
    assert isinstance(progress(total=3, stream=Stream(tty=False)), LineProgress)
    monkeypatch.setenv("GRR_PROGRESS", "lines")
    assert isinstance(progress(total=3, stream=Stream(tty=True)), LineProgress)
    monkeypatch.setenv("GRR_PROGRESS", "bars")
    assert isinstance(progress(total=3, stream=Stream(tty=False)), tqdm)
    monkeypatch.setenv("GRR_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="GRR_PROGRESS='sometimes': expected one of auto, bars, lines"):
        progress(total=3, stream=Stream(tty=False))


def test_iterating_and_disabled(clock):
    out = Stream(tty=False)
    assert list(LineProgress(range(4), total=4, desc="check", unit="shard", first=1, stream=out)) == [0, 1, 2, 3]
    assert counts(out.getvalue()) == ["check: shard 1/4 (25%)", "check: shard 4/4 (100%)"]
    quiet = Stream(tty=False)
    bar = LineProgress(total=4, first=4, disable=True, stream=quiet)
    bar.update(2)
    bar.close()
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_training_with_output_in_a_file_writes_plain_lines_only(tmp_path):
    """`grr train pretrain > log 2>&1`: no carriage return, and one line per step 1-3, then every
    log_every steps, then the last; no validation bar either (leave=False bars write no last line)."""
    data = tmp_path / "data"
    make_shardset(data, shard_sizes=(8,), split="val", seed=1)
    val = json.loads((data / "manifest.json").read_text())["splits"]["val"]
    make_shardset(data, shard_sizes=(8, 8), split="train", seed=0)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"] = val
    (data / "manifest.json").write_text(json.dumps(manifest))
    log = tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRR_PROGRESS", None)
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "grr_cli.main", "train", "pretrain", "--preset", "grr-tiny", "--data", str(data),
             "--out", str(tmp_path / "run"), "--max-steps", "8", "--loader", "cpu",
             *[f"--set={s}" for s in ("per_device_batch_size=4", "global_batch_size=4", "warmup_steps=2",
                                       "num_workers=0", "val_every=3", "val_batch_size=4", "log_every=3",
                                       "log_every_s=1000", "tensorboard=false", "checkpoint_every=100")]],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text  # no redraws, no cursor movement
    steps = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("pretrain x1: step ")]
    assert steps == [f"pretrain x1: step {n}/8 ({p}%)" for n, p in ((1, 12), (2, 25), (3, 38), (6, 75), (8, 100))]
    line = next(line for line in text.splitlines() if line.startswith("pretrain x1: step 6/8"))
    assert " | loss " in line and " lr " in line and " samples/s " in line and ", ETA " in line
    assert sum(line.startswith("step 3 val: loss ") for line in text.splitlines()) == 1
    # the start banner and the end summary (their content: tests/test_train_report.py)
    assert f"== grr train pretrain: {tmp_path / 'run'} (new run) ==" in text
    assert "== done: reached max_steps: step 8 (epoch 2); 8 steps in " in text
