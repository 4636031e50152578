"""`grr train pretrain|finetune|settings` and `grr bench train`: parse, call grr_train, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from grr_cli.groups import bench_app, train_app

NPROC_HELP = "Processes on this node; starts torchrun itself (for several nodes run torchrun directly)."


def _run(recipe: str, extra: list[str], out: str | Path, resume: bool, auto_resume: bool, config: Path | None,
         sets: list[str], nproc: int, defaults: dict | None = None, fresh_only: dict | None = None,
         **flags) -> None:
    """Check every argument (grr_train.train.settings.plan_run), then start torchrun or train here."""
    from grr_data.infra.lock import LockedError
    from grr_data.infra.store import local_folder
    from grr_train.runtime.distributed import relaunch_with_torchrun, strip_nproc_option, under_torchrun
    from grr_train.train.settings import parse_set, plan_run

    try:
        out = local_folder(out, "--out (a run folder)")
        if extra:  # most often the value of `--set key value`: parse_set says how to write it
            parse_set(sets)
            raise ValueError(f"unexpected argument {extra[0]!r}")
        if nproc < 1:
            raise ValueError(f"--nproc-per-node {nproc}: expected 1 or more processes")
        if resume and auto_resume:
            raise ValueError("--resume and --auto-resume: pass one (--auto-resume resumes when there is a checkpoint)")
        mode = "auto" if auto_resume else "yes" if resume else "no"
        cfg, resume, note = plan_run(recipe, out, mode, str(config) if config else None, sets,
                                     defaults=defaults, fresh_only=fresh_only, **flags)
    except (ValueError, OSError) as e:
        _fail(e)
    if nproc > 1 and not under_torchrun():
        raise typer.Exit(relaunch_with_torchrun(nproc, strip_nproc_option(sys.argv[1:])))
    if note and _is_main():
        typer.echo(note, err=True)
    from grr_train.train.trainer import NonFiniteLoss, run_training

    try:
        summary = run_training(cfg, out, resume=resume)
    except (ValueError, OSError, NonFiniteLoss, LockedError) as e:
        _fail(e)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        _fail_if_out_of_memory(e, cfg.preset, cfg.per_device_batch_size or cfg.contrastive_batch_size,
                               "add --set activation_checkpointing=true (blocks recomputed in backward, the same "
                               "results) or lower --set per_device_batch_size=N (it also sets the contrastive batch)")
        raise
    if summary is not None and _is_main():
        typer.echo(json.dumps(summary))


def _fail_if_out_of_memory(err: BaseException, preset: str, micro_batch: int, remedy: str) -> None:
    from grr_train.runtime.device import is_out_of_memory, out_of_memory_advice

    if is_out_of_memory(err):
        _fail(RuntimeError(out_of_memory_advice(err, preset, micro_batch, remedy)))


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1) from None


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


# Options both recipes take, declared once. metavar="" keeps typer from showing <bool> after a flag.
ConfigFile = Annotated[Path | None, typer.Option("--config", metavar="FILE", help=(
    "Settings file: JSON, TOML (.toml) or YAML (.yaml); a run's config.json works as a template."))]
Sets = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help=(
    "Override a setting (repeatable); `grr train settings` lists the names, defaults and meanings."))]
MaxSteps = Annotated[int | None, typer.Option(metavar="N", help="Stop after this many optimizer steps in total.")]
Resume = Annotated[bool, typer.Option("--resume", metavar="", help=(
    "Continue the run in --out from its latest checkpoint (an error when it has none)."))]
AutoResume = Annotated[bool, typer.Option("--auto-resume", metavar="", help=(
    "Continue the run in --out when it holds a checkpoint, else start it: one command line for a requeued "
    "Slurm job or torchrun --max-restarts. The settings must match the run's, as with --resume."))]
NprocPerNode = Annotated[int, typer.Option(metavar="N", help=NPROC_HELP)]
Loader = Annotated[str | None, typer.Option(metavar="auto|dali|cpu", help=(
    "auto (DALI when a GPU and DALI are present), dali or cpu; the same as --set loader=."))]


# Extra arguments reach the command (not typer's usage panel) so `--set key value` gets one clear line.
EXTRA_ARGS = {"allow_extra_args": True}


@train_app.command(context_settings=EXTRA_ARGS)
def pretrain(
    ctx: typer.Context,
    preset: str = typer.Option(None, metavar="NAME", help="Model preset (default grr-coca; see grr model list)."),
    data: str = typer.Option(None, metavar="DIR", help="Sharded set (default data/cc12m/shards)."),
    out: str = typer.Option(None, metavar="DIR", help="Run folder (default runs/pretrain-PRESET)."),
    config: ConfigFile = None,
    set_: Sets = None,
    max_steps: MaxSteps = None,
    resume: Resume = False,
    auto_resume: AutoResume = False,
    nproc_per_node: NprocPerNode = 1,
    loader: Loader = None,
) -> None:
    """Pretrain CoCa with the paper's recipe (DDP; see README for several nodes)."""
    out = out or Path(f"runs/pretrain-{preset or 'grr-coca'}")
    _run("pretrain", ctx.args, out, resume, auto_resume, config, set_ or [], nproc_per_node, preset=preset,
         data=data or None, max_steps=max_steps, loader=loader)


@train_app.command(context_settings=EXTRA_ARGS)
def finetune(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., help="Dataset name: its shards default to data/DATASET/shards, the run to "
                                            "runs/finetune-DATASET; a set from grr data fetch must be this dataset."),
    from_: Path = typer.Option(None, "--from", metavar="DIR", help="Pretrained run folder or checkpoint."),
    data: str = typer.Option(None, metavar="DIR", help="Sharded set (default data/DATASET/shards)."),
    out: str = typer.Option(None, metavar="DIR", help="Run folder (default runs/finetune-DATASET)."),
    config: ConfigFile = None,
    set_: Sets = None,
    max_steps: MaxSteps = None,
    resume: Resume = False,
    auto_resume: AutoResume = False,
    nproc_per_node: NprocPerNode = 1,
    loader: Loader = None,
) -> None:
    """Fine-tune a pretrained model with the paper's recipe (early stopping with soft reset)."""
    out = out or Path(f"runs/finetune-{dataset}")
    # --from may also come from --config or --set init_from=; the config check says so if none does.
    _run("finetune", ctx.args, out, resume, auto_resume, config, set_ or [], nproc_per_node,
         defaults={"data": f"data/{dataset}/shards"},
         fresh_only={"dataset": dataset, "init_from": str(from_) if from_ else None},
         max_steps=max_steps, data=data or None, loader=loader)


@train_app.command()
def settings() -> None:
    """Every --set name with its default (pretrain, and fine-tuning's where it differs) and meaning."""
    from grr_train.train.config import RESUMABLE_KEYS, settings_table

    rows = [("setting", "default (finetune's where it differs)", "meaning")]
    rows += [(name, pre if fine is None else f"{pre} (finetune {fine})", text)
             for name, pre, fine, text in settings_table()]
    width = [max(len(r[i]) for r in rows) for i in (0, 1)]
    for name, default, text in rows:
        typer.echo(f"{name:<{width[0]}}  {default:<{width[1]}}  {text}")
    typer.echo(f"\nA resumed run may change only: {', '.join(sorted(RESUMABLE_KEYS))}.")


@bench_app.command("train")
def bench_train(
    preset: str = typer.Option("grr-coca", help="Model preset."),
    batch_size: int = typer.Option(8, help="Samples per micro-batch."),
    accumulation: int = typer.Option(1, help="Micro-batches per optimizer step."),
    steps: int = typer.Option(10, help="Timed optimizer steps (after the warm-up steps)."),
    warmup: int = typer.Option(2, help="Untimed steps first (compilation happens here)."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."),
    compile: str = typer.Option("off", help="off, blocks (each transformer block), model, or auto (blocks on CUDA)."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", metavar="",
                                                  help="Recompute blocks in backward."),
    count_ops: bool = typer.Option(False, "--count-ops", metavar="",
                                   help="Also count the operators one step dispatches (a CPU proxy for GPU kernel launches)."),
    vocab_size: int = typer.Option(None, help="Vocabulary size (default: the preset's, 32,102 for the paper's)."),
    read_back: str = typer.Option("per-step", help="per-step (as the trainer), deferred (step N's metrics read "
                                  "after step N+1 is launched) or both (alternating, one compiled model)."),
    inductor_mode: str = typer.Option(None, help="torch.compile mode for what --compile compiles, "
                                      "e.g. max-autotune-no-cudagraphs."),
    set_: list[str] = typer.Option(None, "--set", metavar="KEY=VALUE", help=(
        "A training setting the step reads, as grr train takes it: dropout, aligned_widths, fused_caption_loss, "
        "clip_in_optimizer, inductor_random, micro_batch_groups, trim_text_padding (repeatable).")),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print the result as JSON."),
) -> None:
    """The trainer's step on synthetic inputs: samples/s, MFU on a known GPU, peak memory."""
    from grr_train.train.bench import bench_train as run_bench
    from grr_train.train.settings import parse_set

    try:
        settings = parse_set(set_ or [])
    except ValueError as e:
        _fail(e)
    try:
        r = run_bench(preset, batch_size, steps, warmup=warmup, accumulation=accumulation, precision=precision,
                      compile=compile, activation_checkpointing=activation_checkpointing, count_ops=count_ops,
                      vocab_size=vocab_size, read_back=read_back, inductor_mode=inductor_mode, settings=settings)
    except ValueError as e:  # a setting that cannot work with the others
        _fail(e)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        _fail_if_out_of_memory(e, preset, batch_size, "add --activation-checkpointing or lower --batch-size")
        raise
    if json_out:
        typer.echo(json.dumps(r[0] if len(r) == 1 else r))
        return
    for one in r:
        _print_bench_train(one)
    if count_ops:
        typer.echo(f"operators dispatched per step: {r[0]['ops_per_step']} (top: {r[0]['top_ops']})")


def _print_bench_train(r: dict) -> None:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known bf16 peak for this device)"
    memory = f", peak memory {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else ""
    mode = f" {r['inductor_mode']}" if r["inductor_mode"] else ""
    readback = f"{r['read_back']} read-back"
    typer.echo(f"{r['preset']} on {r['device']} ({r['precision']}, compile {r['compile']}{mode}, micro-batch "
               f"{r['batch_size']} x {r['accumulation']}, synthetic inputs, trainer step, {readback}): "
               f"{r['samples_per_s']:.2f} samples/s, {1000 * r['seconds_per_step']:.0f} ms/step, MFU {mfu}{memory}; "
               f"set-up and warm-up {r['setup_and_warmup_s']:.0f} s; dropout {r['dropout']}, levers "
               + ", ".join(f"{k} {v}" for k, v in r["levers"].items()))
