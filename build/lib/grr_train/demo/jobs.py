"""The demo's training jobs: each model pretrains, then fine-tunes from its pretrained run.

On a GPU, or on a CPU with one core, the jobs run one after another in this process. On a CPU
with two or more cores the two models of a seed train at once, each in a process of its own on one
thread: a model this small gains nothing from a second thread, so one model at a time leaves a
core idle (two at once: 1.8 cores busy through a 9.5-minute demo, docs/LOG.md). A job's console output goes to
`<runs>/<short>.log`; this process shows one progress bar per model, read from its runs'
metrics.jsonl.

A stop signal (SIGTERM, Ctrl-C) is passed on to every job: each saves its checkpoint (what
`grr train` does on a signal) and the demo ends with `DemoStopped` naming a stopped run. A job is
`python -m grr_train.demo.jobs` in a session of its own (a terminal's Ctrl-C reaches it once,
through here), given its Job pickled on stdin, answering one JSON line on stdout: a plain
subprocess, not multiprocessing, so a script or notebook calling `run_demo` is never imported
again in the child and no helper process (multiprocessing's resource tracker) outlives the demo.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from grr_data.infra.progress import progress
from grr_train.train.config import TrainConfig
from grr_train.train.trainer import run_training


class DemoStopped(RuntimeError):
    """A stop signal ended a training stage: its run saved a checkpoint; the demo goes no further."""

    def __init__(self, signum: int, run: Path, started: bool = True):
        self.signum = signum
        self.run = run
        self.started = started
        where = (f"while training {run} (its checkpoint is saved there)" if started
                 else f"before training {run} began")
        super().__init__(f"stopped by signal {signum} {where}; the demo went no further: delete {run.parent} "
                         "and run it again to start over")


@dataclass(frozen=True)
class Job:
    name: str  # "GRR-CoCa"
    short: str  # "grr": names the runs and the log
    preset: str
    seed: int
    pretrain: TrainConfig
    finetune: TrainConfig  # its init_from is the pretrained run
    pretrain_run: Path
    finetune_run: Path

    @property
    def log(self) -> Path:
        return self.pretrain_run.parent / f"{self.short}.log"


_signalled: list[int] = []  # in a job's process: signals that came while no stage was training


def run_job(job: Job, say: Callable[[str], None] = print) -> None:
    """Pretrain, then fine-tune, in this process; raises DemoStopped when a signal stopped a stage."""
    for stage, cfg, run, steps in (("pretrain", job.pretrain, job.pretrain_run, job.pretrain.max_steps),
                                   ("fine-tune", job.finetune, job.finetune_run, job.finetune.max_steps)):
        what = f"{steps} steps" if stage == "pretrain" else f"at most {steps} steps"
        say(f"{'3/5' if stage == 'pretrain' else '4/5'} {stage} {job.name} ({job.preset}, seed {job.seed}, {what}) "
            f"-> {run}")
        if _signalled:
            raise DemoStopped(_signalled[0], run, started=False)
        summary = run_training(cfg, run)
        if summary["stop_reason"] == "signal":
            raise DemoStopped(summary["signal"] or signal.SIGTERM, run)


def run_jobs(jobs: list[Job], parallel: bool, say: Callable[[str], None] = print) -> None:
    """Every job, one after another here, or (`parallel`) two at a time in processes of their own."""
    if not parallel:
        for job in jobs:
            run_job(job, say)
        return
    for i in range(0, len(jobs), 2):
        _run_together(jobs[i:i + 2], say)


def _job_main() -> int:
    """`python -m grr_train.demo.jobs`: one job, pickled on stdin; its result, one JSON line, on
    stdout; everything it prints goes to stderr (the parent makes that its log)."""
    for s in (signal.SIGTERM, signal.SIGINT):  # run_training has its own handlers while it trains
        signal.signal(s, lambda signum, _frame: _signalled.append(signum))
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # print() and tqdm into the log as well
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    job = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(1)
    try:
        run_job(job)
        outcome = {"status": "done"}
    except DemoStopped as err:
        outcome = {"status": "stopped", "signum": err.signum, "run": str(err.run), "started": err.started}
    except Exception as err:  # the parent reports it; the traceback stays in the log
        traceback.print_exc()
        outcome = {"status": "error", "message": f"{type(err).__name__}: {err}"}
    result.write(json.dumps(outcome) + "\n")
    result.close()
    return 0


def _last_step(run: Path) -> int:
    """The newest training step in run/metrics.jsonl (0 before the first)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first line of the tail may be cut, the last still being written
        if record.get("kind") == "train":
            return int(record["step"])
    return 0


def _start(job: Job) -> subprocess.Popen:
    """The job in a new Python process of its own session (a terminal's Ctrl-C does not reach it)."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    # The child imports grr_train from where this process did, whatever its working directory.
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with open(job.log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "grr_train.demo.jobs"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True, env=env)
    proc.stdin.write(pickle.dumps(job))
    proc.stdin.close()
    return proc


def _outcome(job: Job, proc: subprocess.Popen) -> dict:
    line = proc.stdout.read().decode("utf-8", "replace").strip()
    proc.stdout.close()
    try:
        return json.loads(line.splitlines()[-1])
    except (ValueError, IndexError):
        return {"status": "error", "message": f"its process ended with exit code {proc.returncode}"}


def _run_together(jobs: list[Job], say: Callable[[str], None]) -> None:
    names = " and ".join(f"{j.name} (seed {j.seed})" for j in jobs)
    say(f"3-4/5 pretrain and fine-tune {names} at once, one process each; their output: "
        + ", ".join(str(j.log) for j in jobs))
    procs: dict[str, subprocess.Popen] = {}
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    outcome: dict[str, dict] = {}
    bars = {j.short: progress(total=j.pretrain.max_steps + j.finetune.max_steps, desc=j.name, unit="step",
                              position=k, leave=True) for k, j in enumerate(jobs)}
    try:
        for job in jobs:
            procs[job.short] = _start(job)
        while len(outcome) < len(jobs):
            time.sleep(1.0)
            for job in jobs:
                bar = bars[job.short]
                steps = _last_step(job.pretrain_run) + _last_step(job.finetune_run)
                if steps != bar.n:
                    bar.update(steps - bar.n)
                proc = procs[job.short]
                if job.short not in outcome and proc.poll() is not None:
                    outcome[job.short] = _outcome(job, proc)
            failed = any(o["status"] == "error" for o in outcome.values())
            if failed and not received:  # no point finishing the other model: stop it, keeping its checkpoint
                forward(signal.SIGTERM, None)
    finally:
        for proc in procs.values():  # only when this loop failed: no job trains on, unwatched
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
        for bar in bars.values():
            bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    by_short = {j.short: j for j in jobs}
    for short, result in outcome.items():
        if result["status"] == "error":
            raise RuntimeError(f"training {by_short[short].name} failed: {result['message']}; its output is in "
                               f"{by_short[short].log}")
    for result in outcome.values():
        if result["status"] == "stopped":
            raise DemoStopped(result["signum"], Path(result["run"]), started=result["started"])


if __name__ == "__main__":
    sys.exit(_job_main())
