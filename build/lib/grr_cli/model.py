"""`grr model list` and `grr model summary`: presets, parameter counts and FLOPs."""

from __future__ import annotations

import json

import typer

from grr_cli.groups import model_app


@model_app.command("list")
def list_presets() -> None:
    """All presets: name, trainable parameters, what differs from baseline-coca."""
    from grr_train.model import PRESETS  # torch loads only for the commands that need it
    from grr_train.model.summary import differences, parameter_table

    reference = PRESETS["baseline-coca"]
    for name, cfg in PRESETS.items():
        total = sum(parameter_table(cfg).values())
        diff = ", ".join(f"{k}={v}" for k, v in differences(cfg, reference).items()) or "(reference)"
        typer.echo(f"{name:<18} {total:>13,}  {diff}")


@model_app.command("summary")
def summary(
    preset: str = typer.Argument(None, help="a preset name (see `grr model list`); none: every preset, one line each"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    count_flops: bool = typer.Option(False, "--count-flops",
                                     help="also count one training step with torch's FLOP counter (seconds)"),
) -> None:
    """Parameters and training FLOPs per sample: of every preset, or per component of one."""
    from grr_train.model import PRESETS
    from grr_train.model.summary import counted_training_flops, preset_overview, summarize

    if preset is None:
        rows = preset_overview()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        typer.echo(f"{'preset':<18} {'parameters':>13}  training FLOPs per sample")
        for r in rows:
            typer.echo(f"{r['preset']:<18} {r['total_params']:>13,}  {r['flops_per_sample']:.4e}")
        return
    if preset not in PRESETS:
        from grr_data.infra.names import did_you_mean

        typer.echo(f"error: unknown preset {preset!r}{did_you_mean(preset, PRESETS)}; known: {', '.join(PRESETS)}",
                   err=True)
        raise typer.Exit(1)
    info = summarize(preset)
    if count_flops:
        info["counted_flops_per_sample"] = counted_training_flops(PRESETS[preset])
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"preset {preset}")
    for label, count in info["components"].items():
        typer.echo(f"  {label:<20} {count:>13,}")
    typer.echo(f"  {'total':<20} {info['total_params']:>13,}")
    typer.echo(f"training FLOPs per sample {info['flops_per_sample']:.4e}  ({info['flops_counting']})")
    if count_flops:
        counted = info["counted_flops_per_sample"]
        typer.echo(f"torch.utils.flop_counter, one forward and backward: {counted:.4e} "
                   f"(x{counted / info['flops_per_sample']:.5f} of the above; the images get no gradient)")
