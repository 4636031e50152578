"""What a run says on the console at its start and at its end, for a person reading the log.

`start_banner` names everything a run was set up with (model and its parameters, data and its
split counts, the batch plan and steps, devices, precision, compile mode, loader), `end_summary`
how it went (steps, time, samples/s, best validation, why it stopped, where its checkpoints and
metrics are). Both are plain text beside what `metrics.jsonl` and the command's final JSON line
record for programs; the trainer passes the facts in, this module only formats them.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from grr_data.format.manifest import Manifest
from grr_train.model import ModelConfig
from grr_train.model.summary import parameter_table
from grr_train.runs.metrics import read_metrics
from grr_train.train.config import TrainConfig
from grr_train.train.plan import BatchPlan


@dataclass(frozen=True)
class RunFacts:
    """What the banner shows, gathered by the trainer once its model, loaders and plan exist."""

    cfg: TrainConfig
    run_dir: Path
    model_config: ModelConfig
    data: Manifest
    plan: BatchPlan
    steps_per_epoch: int
    total_steps: int
    start_step: int
    resumed: bool
    device: torch.device
    autocast: torch.dtype | None
    compile_mode: str
    loader: object  # the train loader: its name is the kind (cpu, dali), a CPU loader has num_workers


def num_parameters(model_config: ModelConfig) -> int:
    return sum(parameter_table(model_config).values())


def start_banner(f: RunFacts) -> list[str]:
    cfg = f.cfg
    start = f"resumed at step {f.start_step}" if f.resumed else "new run"
    # A fine-tuning run's model is the --from run's, whatever its preset setting says.
    source = f"the model of {cfg.init_from}" if cfg.recipe == "finetune" else f"preset {cfg.preset}"
    model = f.model_config
    splits = ", ".join(f"{name} {count:,}" for name, count in f.data.split_sizes.items())
    tokenizer = f.data.tokenizer
    limit = f"max_steps {cfg.max_steps}" if cfg.max_steps is not None and f.total_steps == cfg.max_steps \
        else f"{cfg.epochs} epochs"
    processes = f"{f.plan.world_size} process{'es' if f.plan.world_size > 1 else ''}"
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(f.autocast, "fp32")
    loader = str(getattr(f.loader, "name", type(f.loader).__name__))
    if hasattr(f.loader, "num_workers"):
        workers = f.loader.num_workers
        loader += f" ({workers} worker{'s' if workers != 1 else ''})"
    schedule = (f"lr {cfg.lr_max:g} -> {cfg.lr_min:g}, warm-up {cfg.warmup_steps} steps"
                + (", early stopping" if cfg.early_stop else ""))
    return [
        f"== grr train {cfg.recipe}: {f.run_dir} ({start}) ==",
        f"  model      {source}, {num_parameters(model):,} parameters, dropout {cfg.dropout:g}",
        f"  data       {f.data.root}: {splits} pairs; tokenizer {tokenizer.name} "
        f"(vocabulary {tokenizer.vocab_size:,})",
        f"  batch      {f.plan.describe()}",
        f"  steps      {f.total_steps:,} ({limit}, {f.steps_per_epoch:,} per epoch); {schedule}",
        f"  devices    {processes} on {f.device.type}; precision {precision}; compile {f.compile_mode}; "
        f"parallelism {cfg.parallelism}; loader {loader}",
    ]


@dataclass(frozen=True)
class RunOutcome:
    stop_reason: str
    step: int
    epoch: int
    steps_this_session: int
    seconds: float  # wall time of train(), validation and saves included
    step_seconds: float  # the optimizer steps alone
    global_batch: int
    signal: int | None
    num_skipped: int


def end_summary(run_dir: Path, outcome: RunOutcome, val_split: str) -> list[str]:
    o = outcome
    rate = o.steps_this_session * o.global_batch / o.step_seconds if o.step_seconds > 0 else 0.0
    lines = [f"== {_why(o)}: step {o.step:,} (epoch {o.epoch}); {o.steps_this_session:,} steps in "
             f"{_clock(o.seconds)} this session, {rate:.1f} samples/s while training =="]
    best = best_validation(run_dir)
    if best is not None:
        lines.append(f"  best {val_split} loss {best['loss']:.4f} at step {best['step']:,}"
                     + (f" (perplexity {best['perplexity']:.2f})" if "perplexity" in best else ""))
    if o.num_skipped:
        lines.append(f"  skipped steps (non-finite): {o.num_skipped}")
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / "latest"
    if latest.is_file():
        lines.append(f"  checkpoint {checkpoints / latest.read_text().strip()}"
                     + (f"; best by validation {checkpoints / 'best'}" if (checkpoints / "best").is_dir() else ""))
    lines.append(f"  metrics    {run_dir / 'metrics.jsonl'}"
                 + (f"; TensorBoard {run_dir / 'tensorboard'}" if (run_dir / "tensorboard").is_dir() else ""))
    if o.stop_reason == "signal":
        lines.append("  continue with the same command and --resume (or --auto-resume)")
    return lines


def best_validation(run_dir: Path) -> dict | None:
    """The val record with the lowest finite loss in the run's metrics (across resumes), or None."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [r for r in read_metrics(path, "val") if isinstance(r.get("loss"), (int, float)) and r["loss"] == r["loss"]]
    return min(records, key=lambda r: r["loss"]) if records else None


def _why(o: RunOutcome) -> str:
    if o.stop_reason == "signal":
        name = signal.Signals(o.signal).name if o.signal else "a signal"
        return f"stopped by {name}, checkpoint saved"
    return {"max_steps": "done: reached max_steps", "epochs": "done: all epochs trained",
            "early_stop": "done: early stopping ended the run"}.get(o.stop_reason, f"stopped: {o.stop_reason}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
