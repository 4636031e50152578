"""`grr train pretrain|finetune` and `grr bench train`: parse, call grr_train, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.groups import bench_app, train_app

NPROC_HELP = "Processes on this node; starts torchrun itself (for several nodes run torchrun directly)."


def _run(recipe: str, out: Path, resume: bool, config: Path | None, sets: list[str], nproc: int,
         defaults: dict | None = None, **flags) -> None:
    from grr_data.lock import LockedError
    from grr_train.config import resolve_config, resume_config
    from grr_train.distributed import relaunch_with_torchrun, strip_nproc_option, under_torchrun
    from grr_train.trainer import NonFiniteLoss, run_training

    if nproc > 1 and not under_torchrun():
        raise typer.Exit(relaunch_with_torchrun(nproc, strip_nproc_option(sys.argv[1:])))
    try:
        if resume:
            if config is not None:
                raise ValueError("--config cannot be combined with --resume: the run keeps its config.json")
            cfg = resume_config(out, sets, **flags)
        else:
            cfg = resolve_config(recipe, str(config) if config else None, sets, defaults=defaults, **flags)
        summary = run_training(cfg, out, resume=resume)
    except (ValueError, OSError, NonFiniteLoss, LockedError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if summary is not None and _is_main():
        typer.echo(json.dumps(summary))


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


# Options both recipes take, declared once.
ConfigFile = Annotated[Path | None, typer.Option("--config", help="JSON file of settings.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: --set key=value "
                                                "(repeatable; see grr_train/config.py for the names).")]
MaxSteps = Annotated[int | None, typer.Option(help="Stop after this many optimizer steps in total.")]
Resume = Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")]
NprocPerNode = Annotated[int, typer.Option(help=NPROC_HELP)]
Loader = Annotated[str | None, typer.Option(help="auto (DALI when a GPU and DALI are present), dali or cpu; "
                                            "the same as --set loader=.")]


@train_app.command()
def pretrain(
    preset: str = typer.Option(None, help="Model preset (default grr-coca)."),
    data: Path = typer.Option(None, help="Sharded set (default data/cc12m/shards)."),
    out: Path = typer.Option(None, help="Run folder (default runs/pretrain-PRESET)."),
    config: ConfigFile = None,
    set_: Sets = None,
    max_steps: MaxSteps = None,
    resume: Resume = False,
    nproc_per_node: NprocPerNode = 1,
    loader: Loader = None,
) -> None:
    """Pretrain CoCa with the paper's recipe (DDP; see README for several nodes)."""
    out = out or Path(f"runs/pretrain-{preset or 'grr-coca'}")
    _run("pretrain", out, resume, config, set_ or [], nproc_per_node, preset=preset,
         data=str(data) if data else None, max_steps=max_steps, loader=loader)


@train_app.command()
def finetune(
    dataset: str = typer.Argument(..., help="Dataset name: its shards default to data/DATASET/shards."),
    from_: Path = typer.Option(None, "--from", help="Pretrained run folder or checkpoint."),
    data: Path = typer.Option(None, help="Sharded set (default data/DATASET/shards)."),
    out: Path = typer.Option(None, help="Run folder (default runs/finetune-DATASET)."),
    config: ConfigFile = None,
    set_: Sets = None,
    max_steps: MaxSteps = None,
    resume: Resume = False,
    nproc_per_node: NprocPerNode = 1,
    loader: Loader = None,
) -> None:
    """Fine-tune a pretrained model with the paper's recipe (early stopping with soft reset)."""
    out = out or Path(f"runs/finetune-{dataset}")
    flags = {"max_steps": max_steps, "data": str(data) if data else None, "loader": loader}
    defaults = None
    if not resume:
        # --from may also come from --config or --set init_from=; the config check says so if none does.
        flags.update(dataset=dataset, init_from=str(from_) if from_ else None)
        defaults = {"data": f"data/{dataset}/shards"}
    _run("finetune", out, resume, config, set_ or [], nproc_per_node, defaults=defaults, **flags)


@bench_app.command("train")
def bench_train(
    preset: str = typer.Option("grr-coca", help="Model preset."),
    batch_size: int = typer.Option(8, help="Samples per micro-batch."),
    accumulation: int = typer.Option(1, help="Micro-batches per optimizer step."),
    steps: int = typer.Option(10, help="Timed optimizer steps (after the warm-up steps)."),
    warmup: int = typer.Option(2, help="Untimed steps first (compilation happens here)."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."),
    compile: str = typer.Option("off", help="off, blocks (each transformer block), model, or auto (blocks on CUDA)."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", help="Recompute blocks in backward."),
    count_ops: bool = typer.Option(False, "--count-ops", help="Also count the operators one step dispatches (a CPU proxy for GPU kernel launches)."),
    vocab_size: int = typer.Option(None, help="Vocabulary size (default: the preset's, 32,102 for the paper's)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """The trainer's step on synthetic inputs: samples/s, MFU on a known GPU, peak memory."""
    from grr_train.bench import bench_train as run_bench

    r = run_bench(preset, batch_size, steps, warmup=warmup, accumulation=accumulation, precision=precision,
                  compile=compile, activation_checkpointing=activation_checkpointing, count_ops=count_ops,
                  vocab_size=vocab_size)
    if json_out:
        typer.echo(json.dumps(r))
        return
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known bf16 peak for this device)"
    memory = f", peak memory {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else ""
    typer.echo(f"{r['preset']} on {r['device']} ({r['precision']}, compile {r['compile']}, micro-batch "
               f"{r['batch_size']} x {r['accumulation']}, synthetic inputs, trainer step): "
               f"{r['samples_per_s']:.2f} samples/s, {1000 * r['seconds_per_step']:.0f} ms/step, MFU {mfu}{memory}")
    if count_ops:
        typer.echo(f"operators dispatched per step: {r['ops_per_step']} (top: {r['top_ops']})")
