"""The `grr` app and its command groups: every cli module adds its commands to one of these with
their decorators (`@app.command`, `@model_app.command`, ...); `grr_cli.main` only imports the modules."""

from importlib import metadata

import typer

app = typer.Typer(help="GRR-CoCa: data, training and evaluation.", no_args_is_help=True)
model_app = typer.Typer(help="Model presets, parameter counts and FLOPs.", no_args_is_help=True)
data_app = typer.Typer(help="Fetch datasets, shard them, check shards.", no_args_is_help=True)
train_app = typer.Typer(help="Pretrain and fine-tune (DDP).", no_args_is_help=True)
bench_app = typer.Typer(help="Throughput benchmarks.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(bench_app, name="bench")

DISTRIBUTION = "grr-coca"


def version() -> str:
    """The installed grr's version (the `grr-coca` distribution's)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: `pip install .` in the repository)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"grr {version()}")
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, metavar="",
                                            help="Print grr's version and exit.")) -> None:
    """GRR-CoCa: data, training and evaluation."""
