"""`grr demo`: the whole pipeline on the offline sample set, Baseline CoCa against GRR-CoCa.

Fetch the sample set, shard it, pretrain a tiny Baseline CoCa and a tiny GRR-CoCa with the same
budget and seed, fine-tune both, evaluate all four runs, write the Table 2 comparison and its
plots. Every step calls the library function its real command calls (`grr data fetch`,
`grr data shard`, `grr train pretrain|finetune`, `grr eval`, `grr compare`), with the paper's
recipes changed only in size: tiny presets, small batches, few steps, warm-up scaled to the
steps. The sample set is the only data offline, so fine-tuning uses it too. The numbers show
the pipeline works; on 26 training pairs they say nothing about the architectures.

It runs every stage of the pipeline, so this one module of `grr_train` also imports
`grr_data`'s fetch and shard steps (tests/test_boundaries.py names it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grr_data.dataset import DatasetInfo
from grr_data.fetch import FetchOptions, fetch
from grr_data.shard import shard_dataset
from grr_train.captioning import decode_words_for
from grr_train.compare import Section, write_report
from grr_train.config import resolve_config
from grr_train.device import resolve_device
from grr_train.evaluate import evaluate_run
from grr_train.generate import DecodeOptions
from grr_train.trainer import run_training

PRESETS = (("Baseline CoCa", "baseline", "baseline-tiny"), ("GRR-CoCa", "grr", "grr-tiny"))


@dataclass(frozen=True)
class DemoPlan:
    pretrain_steps: int
    finetune_steps: int
    caption_tokens: int
    batch_size: int = 8
    seed: int = 0


FULL = DemoPlan(pretrain_steps=600, finetune_steps=200, caption_tokens=20)
QUICK = DemoPlan(pretrain_steps=8, finetune_steps=4, caption_tokens=8)


class DemoStopped(RuntimeError):
    """A stop signal ended a training stage: its run saved a checkpoint; the demo goes no further."""

    def __init__(self, signum: int, run: Path):
        self.signum = signum
        super().__init__(f"stopped by signal {signum} while training {run} (its checkpoint is saved there); "
                         f"the demo went no further: delete {run.parent} and run it again to start over")


def _train(cfg, run: Path) -> None:
    summary = run_training(cfg, run)
    if summary["stop_reason"] == "signal":
        raise DemoStopped(summary["signal"] or 15, run)


def _settings(plan: DemoPlan, steps: int, val_size: int) -> list[str]:
    return [
        f"global_batch_size={plan.batch_size}", f"per_device_batch_size={plan.batch_size}",
        f"val_batch_size={val_size}", f"val_contrastive_batch_size={val_size}",
        f"warmup_steps={max(1, steps // 10)}", f"seed={plan.seed}", f"checkpoint_every={steps}",
        "keep_checkpoints=1", "num_workers=1", "tensorboard=false", "epochs=100000",
    ]


def run_demo(out: str | Path, plan: DemoPlan = FULL, say: Callable[[str], None] = print) -> dict:
    """Run every step into `out`, announcing each with `say`; returns the report's paths
    ({what: path}, "markdown" among them). Training and evaluation take a GPU when there is one."""
    out = Path(out)
    device = resolve_device("auto")
    runs = out / "runs"
    if runs.exists() and any(runs.iterdir()):
        raise FileExistsError(f"{runs} holds runs of an earlier demo; pass another --out or delete that folder")
    fetched, shards = out / "data" / "fetched", out / "data" / "shards"
    say(f"1/5 fetch the sample set -> {fetched}")
    fetch("sample", FetchOptions(out=fetched))
    say(f"2/5 shard it -> {shards}")
    if not DatasetInfo.exists(shards):
        shard_dataset(fetched, shards, progress=False)
    val_size = DatasetInfo.read(shards).num_samples("val")

    finetuned = {}
    for name, short, preset in PRESETS:
        pre, fine = runs / f"pretrain-{short}", runs / f"finetune-{short}"
        say(f"3/5 pretrain {name} ({preset}, {plan.pretrain_steps} steps) -> {pre}")
        cfg = resolve_config("pretrain", None, _settings(plan, plan.pretrain_steps, val_size), preset=preset,
                             data=str(shards), max_steps=plan.pretrain_steps)
        _train(cfg, pre)
        say(f"4/5 fine-tune {name} (at most {plan.finetune_steps} steps) -> {fine}")
        cfg = resolve_config("finetune", None, _settings(plan, plan.finetune_steps, val_size), dataset="sample",
                             init_from=str(pre), data=str(shards), max_steps=plan.finetune_steps)
        _train(cfg, fine)
        finetuned[short] = (pre, fine)

    say("5/5 evaluate the four runs and compare")
    decode_words = decode_words_for(finetuned["baseline"][0])  # the tokenizer the runs recorded
    options = DecodeOptions(max_len=plan.caption_tokens)

    def evaluate(run: Path) -> dict:
        return evaluate_run(run, shards, "val", batch_size=val_size, contrastive_batch_size=val_size,
                            decode_words=decode_words, decode_options=options, num_workers=1, device=device)

    sections = []
    for stage, index in (("Pretraining", 0), ("Fine-Tuning", 1)):
        run_a, run_b = finetuned["baseline"][index], finetuned["grr"][index]
        sections.append(Section(f"{stage}: sample val", evaluate(run_a), evaluate(run_b), str(run_a), str(run_b)))
    return write_report(sections, out / "report", (PRESETS[0][0], PRESETS[1][0]))
