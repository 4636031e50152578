"""`grr demo`: the whole pipeline on the synthetic shapes set, Baseline CoCa against GRR-CoCa.

Draw the shapes set (coloured shapes with compositional captions, `grr data fetch shapes`),
shard it with the word-level tokenizer that comes with it, pretrain a tiny Baseline CoCa and a
tiny GRR-CoCa with the same budget and seed, fine-tune both, evaluate them on the val split (new
images of the colour-shape pairs seen in training) and the test split (pairs no training image
shows), and write the Table 2 comparison, its plots and a grid of example captions. Every step
calls the library function its real command calls (`grr data fetch`, `grr data shard`,
`grr train pretrain|finetune`, `grr eval`, `grr compare`).

The paper's recipes are scaled to a CPU and a set of a few thousand pairs, not changed in kind:
tiny presets with 16-px patches (`*-tiny-p16`: 18 x 18 tokens, a shape spans 3 to 7 patches a
side; after 1,000 steps 16-px patches gave 20.5% exact captions, 24-px 9.5%, 32-px 2%, docs/LOG.md);
batch 32, which is also the contrastive batch (the paper: 768 and 192); pretraining with equal
loss weights and no dropout (the paper: 2, 1 and 0.15, which reached 11% exact captions where
these reached 16.5% with 32-px patches), fine-tuning with the paper's weights (1, 2) and no
dropout either (with the paper's 0.1, 100 steps took exact captions from 13% to 10.5%); a peak
rate of 5e-4, x5 the paper's, for models this small (2e-3 left the image tower blind for the
quick plan's 300 steps; at 1,000 steps 2e-3, 1e-3 and 5e-4 came out alike), one cosine over the
pretraining run where the paper restarts it every epoch (tens of steps here), warm-up a tenth of
it; fine-tuning at a tenth of the pretraining rate with early stopping each epoch, as the paper.
The text decoders run only over the caption positions a batch uses (`trim_text_padding`: the same
losses, ~0.8x the time per step). Captions are scored by beam search with 3 beams (15.5% exact
where greedy decoding gave 13.0%, same run).
On a CPU each model trains on one thread, the two models at once (grr_train/demo/jobs.py): a model
this small gains nothing from more, and on a busy 2-core machine two threads cost ~10x the CPU
time per step (docs/LOG.md).

On a GPU the demo trains larger presets (`*-small-p16`) on more pairs with three seeds, sized
from the card's memory (grr_train/demo/sizing.py; those sizes are not measured on a GPU yet).

It runs every stage of the pipeline, so this one module of `grr_train` also imports
`grr_data`'s fetch and shard steps (tests/test_boundaries.py names it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from grr_data.fetch import FetchOptions, fetch
from grr_data.format.manifest import Manifest
from grr_data.infra.procs import usable_cores
from grr_data.shard.run import shard_dataset
from grr_train.demo.jobs import Job, run_jobs
from grr_train.demo.report import exact_by_kind, example_grid, mean_eval, preface
from grr_train.demo.sizing import FULL, DemoPlan
from grr_train.eval.compare import Section, write_report
from grr_train.eval.evaluate import evaluate_run
from grr_train.infer.captioning import decode_words_for
from grr_train.infer.generate import DecodeOptions
from grr_train.runs.weights import load_model
from grr_train.runtime.device import resolve_device
from grr_train.train.settings import resolve_config

MODELS = (("Baseline CoCa", "baseline"), ("GRR-CoCa", "grr"))  # with the plan's presets, in this order


def _common(plan: DemoPlan, seed: int, steps: int, val_size: int) -> list[str]:
    return [
        f"global_batch_size={plan.batch_size}", f"per_device_batch_size={plan.batch_size}",
        f"val_batch_size={val_size}", f"val_contrastive_batch_size={val_size}", f"seed={seed}",
        f"checkpoint_every={steps}", "keep_checkpoints=1", f"num_workers={plan.num_workers}", "tensorboard=false", "epochs=100000",
        # Text decoders over the used caption positions only; that needs eager mode, which also
        # suits models this small on a GPU (compile=auto would compile them there and be refused).
        "trim_text_padding=true", "compile=off",
    ]


def _pretrain_settings(plan: DemoPlan, seed: int, val_size: int) -> list[str]:
    steps = plan.pretrain_steps
    warmup = max(1, steps // 10)
    return _common(plan, seed, steps, val_size) + [
        f"lr_max={plan.lr}", f"lr_min={plan.lr / 100}", f"warmup_steps={warmup}",
        f"lr_cycle_steps={max(1, steps - warmup)}", "lambda_con=1", "dropout=0",
    ]


def _finetune_settings(plan: DemoPlan, seed: int, val_size: int) -> list[str]:
    return _common(plan, seed, plan.finetune_steps, val_size) + [
        f"lr_max={plan.lr / 10}", f"lr_min={plan.lr / 1000}", "dropout=0",
    ]


def _parallel(plan: DemoPlan, device: str) -> bool:
    """Train the two models at once: on a CPU with two or more cores, unless the plan says not to."""
    if plan.parallel is not None:
        return plan.parallel
    return device == "cpu" and usable_cores() >= 2


@contextlib.contextmanager
def _threads(device: str):
    """One intra-op thread for the tiny models on a CPU, restored afterwards."""
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(out: str | Path, plan: DemoPlan = FULL, say: Callable[[str], None] = print) -> dict:
    """Run every step into `out`, announcing each with `say`; returns the report's paths
    ({what: path}, "markdown" among them). Training and evaluation take a GPU when there is one."""
    started = time.time()
    out = Path(out)
    device = resolve_device("auto")
    presets = [(name, short, preset) for (name, short), preset in zip(MODELS, plan.presets, strict=True)]
    runs = out / "runs"
    if runs.exists() and any(runs.iterdir()):
        raise FileExistsError(f"{runs} holds runs of an earlier demo; pass another --out or delete that folder")
    fetched, shards = out / "data" / "fetched", out / "data" / "shards"
    say(f"1/5 draw {plan.num_pairs} shapes pairs -> {fetched}")
    drawn = fetch("shapes", FetchOptions(out=fetched, num_pairs=plan.num_pairs, seed=plan.data_seed))
    say(f"2/5 shard them with the set's word-level tokenizer -> {shards}")
    if not Manifest.exists(shards):
        shard_dataset(fetched, shards, tokenizer=str(fetched / drawn["shapes"]["tokenizer"]), progress=False)
    splits = Manifest.read(shards).split_sizes
    val_size = splits["val"]

    jobs = []
    for seed in plan.seeds:
        folder = runs if len(plan.seeds) == 1 else runs / f"seed{seed}"
        for name, short, preset in presets:
            pre, fine = folder / f"pretrain-{short}", folder / f"finetune-{short}"
            pretrain = resolve_config("pretrain", None, _pretrain_settings(plan, seed, val_size), preset=preset,
                                      data=str(shards), max_steps=plan.pretrain_steps)
            finetune = resolve_config("finetune", None, _finetune_settings(plan, seed, val_size), dataset="shapes",
                                      init_from=str(pre), data=str(shards), max_steps=plan.finetune_steps)
            jobs.append(Job(name, short, preset, seed, pretrain, finetune, pre, fine))
    trained = {(job.short, job.seed): (job.pretrain_run, job.finetune_run) for job in jobs}  # (short, seed) -> runs
    with _threads(device):
        run_jobs(jobs, parallel=_parallel(plan, device), say=say)

        say("5/5 evaluate the runs on val (seen pairs) and test (unseen pairs), and compare")
        decode_words = decode_words_for(trained["baseline", plan.seeds[0]][0])  # the tokenizer the runs recorded
        options = DecodeOptions(max_len=plan.caption_tokens, beams=plan.beams)

        def evaluate(run: Path, split: str) -> dict:
            size = splits[split]
            return evaluate_run(run, shards, split, batch_size=min(size, 256), contrastive_batch_size=val_size,
                                decode_words=decode_words, decode_options=options, num_workers=1, device=device)

        sections, panels, kinds = [], [], {}
        stages = (("Pretraining", 0, "val"), ("Fine-Tuning", 1, "val"), ("Fine-Tuning", 1, "test"))
        for stage, index, split in stages:
            what = "seen" if split == "val" else "unseen"
            title = f"{stage}: shapes {split} ({what} colour-shape pairs)"
            evals = {short: [evaluate(trained[short, seed][index], split) for seed in plan.seeds]
                     for _, short, _ in presets}
            (eval_a, sd_a), (eval_b, sd_b) = mean_eval(evals["baseline"]), mean_eval(evals["grr"])
            first = plan.seeds[0]
            sections.append(Section(title, eval_a, eval_b, str(trained["baseline", first][index]),
                                    str(trained["grr", first][index]), sd_a or None, sd_b or None))
            if index == 1:
                panels.append((f"{split}: {what} pairs", split, evals["baseline"][0], evals["grr"][0]))
                for (name, short, _) in presets:
                    kinds[f"{name}, {split} ({what})"] = exact_by_kind(evals[short][0])

    parameters = {short: sum(p.numel() for p in load_model(trained[short, plan.seeds[0]][1])[0].parameters())
                  for _, short, _ in presets}
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    names = (MODELS[0][0], MODELS[1][0])
    grid = example_grid(shards, panels, names, report / "examples.png")
    text = preface(num_pairs=plan.num_pairs, splits=splits, pretrain_steps=plan.pretrain_steps,
                   finetune_steps=plan.finetune_steps, batch_size=plan.batch_size, seeds=list(plan.seeds),
                   minutes=(time.time() - started) / 60, grid=str(grid), kinds=kinds,
                   parameters=(parameters["baseline"], parameters["grr"]), device=plan.device_name,
                   presets=plan.presets)
    paths = write_report(sections, report, names, preface=text)
    return {**paths, "examples": str(grid)}
