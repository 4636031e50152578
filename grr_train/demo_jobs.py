"""The demo's training jobs: each model pretrains, then fine-tunes from its pretrained run.

On a GPU, or on a CPU with one core, the jobs run one after another in this process. On a CPU
with two or more cores the two models of a seed train at once, each in a process of its own on one
thread: a model this small gains nothing from a second thread, so one model at a time leaves a
core idle (two at once: ~2x the steps per minute, docs/LOG.md). A job's console output goes to
`<runs>/<short>.log`; this process shows one progress bar per model, read from its runs'
metrics.jsonl.

A stop signal (SIGTERM, Ctrl-C) is passed on to every job: each saves its checkpoint (what
`grr train` does on a signal) and the demo ends with `DemoStopped` naming a stopped run. The
jobs run in process groups of their own, so a terminal's Ctrl-C reaches them once, through here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from grr_train.config import TrainConfig
from grr_train.trainer import run_training


class DemoStopped(RuntimeError):
    """A stop signal ended a training stage: its run saved a checkpoint; the demo goes no further."""

    def __init__(self, signum: int, run: Path, started: bool = True):
        self.signum = signum
        self.run = run
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


def _child(job: Job, results) -> None:
    """A job in a spawned process: its own process group, one thread, output to its log."""
    os.setpgrp()
    for s in (signal.SIGTERM, signal.SIGINT):  # run_training has its own handlers while it trains
        signal.signal(s, lambda signum, _frame: _signalled.append(signum))
    fd = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)
    try:
        run_job(job)
    except DemoStopped as err:
        results.put((job.short, "stopped", (err.signum, str(err.run), str(err))))
    except BaseException as err:  # the parent reports it; the traceback stays in the log
        traceback.print_exc()
        results.put((job.short, "error", f"{type(err).__name__}: {err}"))
    else:
        results.put((job.short, "done", None))


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


def _run_together(jobs: list[Job], say: Callable[[str], None]) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    names = " and ".join(f"{j.name} (seed {j.seed})" for j in jobs)
    say(f"3-4/5 pretrain and fine-tune {names} at once, one process each; their output: "
        + ", ".join(str(j.log) for j in jobs))
    for job in jobs:
        job.pretrain_run.parent.mkdir(parents=True, exist_ok=True)
    procs = {job.short: context.Process(target=_child, args=(job, results), name=f"grr-demo-{job.short}")
             for job in jobs}
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for proc in procs.values():
            if proc.is_alive():
                os.kill(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    outcome: dict[str, tuple[str, object]] = {}
    bars = {j.short: tqdm(total=j.pretrain.max_steps + j.finetune.max_steps, desc=j.name, unit="step",
                          position=k, leave=True) for k, j in enumerate(jobs)}
    try:
        for proc in procs.values():
            proc.start()
        while len(outcome) < len(jobs):
            try:
                short, status, detail = results.get(timeout=1.0)
                outcome[short] = (status, detail)
            except queue.Empty:
                pass
            for job in jobs:
                bars[job.short].n = _last_step(job.pretrain_run) + _last_step(job.finetune_run)
                bars[job.short].refresh()
                proc = procs[job.short]
                if job.short not in outcome and not proc.is_alive() and proc.exitcode is not None:
                    try:  # it may have put its result just before exiting
                        short, status, detail = results.get(timeout=1.0)
                        outcome[short] = (status, detail)
                    except queue.Empty:
                        outcome[job.short] = ("error", f"its process ended with exit code {proc.exitcode}")
            failed = [s for s, (status, _) in outcome.items() if status == "error"]
            if failed and not received:  # no point finishing the other model: stop it, keeping its checkpoint
                forward(signal.SIGTERM, None)
        for proc in procs.values():
            proc.join()
    finally:
        for bar in bars.values():
            bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    by_short = {j.short: j for j in jobs}
    for short, (status, detail) in outcome.items():
        if status == "error":
            raise RuntimeError(f"training {by_short[short].name} failed: {detail}; its output is in "
                               f"{by_short[short].log}")
    for status, detail in outcome.values():
        if status == "stopped":
            signum, run, message = detail
            raise DemoStopped(signum, Path(run), started="while training" in message)
