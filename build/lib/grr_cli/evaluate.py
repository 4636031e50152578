"""`grr eval` and `grr compare`: parse, call grr_train, print."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from grr_cli.groups import app

DEVICE_HELP = "cpu, cuda, cuda:N, or auto (a GPU when there is one)."
TOKENIZER_HELP = "Tokenizer name or folder, to turn ids into text (default: the one the run was trained with)."


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


@app.command("eval")
def eval_(
    run_or_ckpt: Path = typer.Argument(..., help="Run folder or checkpoint folder."),
    data: str = typer.Option(..., help="Sharded set to evaluate on."),
    split: str = typer.Option("val", help="Split of the set."),
    batch_size: int = typer.Option(32, help="Loader batch size (does not change any number)."),
    contrastive_batch_size: int = typer.Option(None, help="Contrastive loss batch (default: the run's validation one)."),
    max_samples: int = typer.Option(None, help="Evaluate only the first N samples of the split."),
    beams: int = typer.Option(1, help="Beams for the scored captions (1: greedy)."),
    max_len: int = typer.Option(30, help="Longest generated caption, in tokens."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help="auto (the run's training precision: bf16 autocast on a GPU, "
                                               "fp32 on the CPU unless the run set one), fp32 or bf16."),
    json_: bool = typer.Option(False, "--json", help="Print every number as JSON."),
    allow_other_tokenizer: bool = typer.Option(False, "--allow-other-tokenizer",
                                               help="Evaluate on a set whose tokenizer fingerprint differs from the run's."),
) -> None:
    """Table 2 metrics (CoCa loss, perplexity, contrastive loss), recall@k, BLEU-4 and CIDEr-D."""
    from grr_train.eval.evaluate import evaluate_run, format_eval
    from grr_train.infer.captioning import decode_words_for
    from grr_train.infer.generate import DecodeOptions
    from grr_train.runtime.device import resolve_device

    try:
        dev = resolve_device(device)
        decode_words = decode_words_for(run_or_ckpt, tokenizer, data)
        result = evaluate_run(run_or_ckpt, data, split, batch_size, contrastive_batch_size, max_samples,
                              decode_words, DecodeOptions(beams=beams, max_len=max_len), dev, precision=precision,
                              allow_other_tokenizer=allow_other_tokenizer)
    except (ValueError, OSError) as err:  # OSError: a missing file, a store out of reach
        _fail(err)
    typer.echo(json.dumps(result, indent=2) if json_ else format_eval(result))


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="First run (the reference, e.g. Baseline CoCa)."),
    run_b: Path = typer.Argument(..., help="Second run (e.g. GRR-CoCa)."),
    data: str = typer.Option(..., help="Sharded set both runs are evaluated on."),
    out: Path = typer.Option(Path("reports/compare"), help="Folder for the report and plots."),
    split: str = typer.Option("val", help="Split of the set."),
    title: str = typer.Option(None, help="Section title (default: the set and split)."),
    name_a: str = typer.Option(None, help="Column name of the first run (default: its folder name)."),
    name_b: str = typer.Option(None, help="Column name of the second run (default: its folder name)."),
    contrastive_batch_size: int = typer.Option(None, help="Contrastive loss batch (default: run A's validation one)."),
    max_samples: int = typer.Option(None, help="Evaluate only the first N samples of the split."),
    batch_size: int = typer.Option(32, help="Loader batch size (does not change any number)."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Evaluate two runs on the same data; write the Table 2 layout (Markdown, JSON) and plots."""
    from grr_train.eval.compare import compare_runs
    from grr_train.runtime.device import resolve_device

    try:
        paths = compare_runs(run_a, run_b, data, out, split=split, title=title, names=(name_a, name_b),
                             tokenizer=tokenizer, contrastive_batch_size=contrastive_batch_size,
                             max_samples=max_samples, batch_size=batch_size, device=resolve_device(device))
    except (ValueError, OSError) as err:  # OSError: a missing file, a store out of reach
        _fail(err)
    typer.echo(Path(paths["markdown"]).read_text())
    for what, path in paths.items():
        typer.echo(f"{what}: {path}")
