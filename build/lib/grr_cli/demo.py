"""`grr demo`: parse, call `grr_train.demo.run.run_demo`, print."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from grr_cli.groups import app


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for data, runs and the report."),
    quick: bool = typer.Option(False, "--quick", help="A minutes-long run on fewer pairs (what the test suite runs)."),
    seeds: int = typer.Option(None, min=1, help="Train each model with this many seeds (0, 1, ...) and report the "
                                                "mean and standard deviation; each seed adds the whole training "
                                                "time (default: 1 on a CPU, 3 on a GPU)."),
) -> None:
    """Offline: shapes set -> shards -> pretrain and fine-tune both models -> eval -> Table 2 (on a GPU, larger)."""
    from grr_train.demo.jobs import DemoStopped
    from grr_train.demo.run import run_demo
    from grr_train.demo.sizing import DeviceInfo, choose_plan
    from grr_train.runtime.device import resolve_device

    started = time.time()
    plan = choose_plan(DeviceInfo.of(resolve_device("auto")), quick=quick, seeds=seeds)
    try:
        paths = run_demo(out, plan, say=lambda text: typer.secho(text, fg=typer.colors.CYAN, bold=True))
    except DemoStopped as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(128 + err.signum) from None
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo("")
    typer.echo(Path(paths["markdown"]).read_text())
    typer.echo(f"demo finished in {time.time() - started:.0f} s; everything is under {out}:")
    typer.echo(f"  runs: {out / 'runs'}")
    for what, path in paths.items():
        typer.echo(f"  {what}: {path}")
