"""`grr export`: parse, call grr_train.infer.export, print."""

from __future__ import annotations

from pathlib import Path

import typer

from grr_cli.groups import app


@app.command()
def export(
    run_or_ckpt: Path = typer.Argument(..., help="Run folder (its best, else newest checkpoint) or checkpoint folder."),
    out: Path = typer.Option(..., help="New folder for the export (Hugging Face layout)."),
    push: str = typer.Option(None, help="Also upload the folder to this hub repo (user/name); needs network."),
    private: bool = typer.Option(False, help="Create the hub repo private (with --push)."),
    tokenizer: Path = typer.Option(None, help="Tokenizer name or folder (default: the run's own copy)."),
) -> None:
    """Write a run as config.json, model.safetensors, tokenizer files and a model card (README.md)."""
    from grr_train.infer.export import export_run, push_export

    try:
        folder = export_run(run_or_ckpt, out, tokenizer)
        typer.echo(f"exported {run_or_ckpt} to {folder}")
        if push:
            typer.echo(f"pushed to {push}: {push_export(folder, push, private=private)}")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
