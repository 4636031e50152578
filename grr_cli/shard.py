"""`grr data shard` and `grr data check`: thin wrappers over grr_data.shard.run and grr_data.check."""

from __future__ import annotations

import logging

import typer

from grr_cli.groups import data_app


@data_app.command("shard")
def shard(
    input: str = typer.Option(..., "--input", help=(
        "What to shard, one of: (1) a `grr data fetch` output folder (img2dataset tars, optionally in train/ "
        "val/ test/ subfolders); (2) a folder of images with a caption beside each, name.jpg|jpeg|png|webp + "
        "name.txt (UTF-8), searched recursively; (3) a .csv with a `path,caption` header or a .jsonl of "
        '{"path": ..., "caption": ...} lines, paths relative to the list\'s folder or absolute. '
        "(2) and (3) are read in sorted path order (a list: line order); a missing caption or image, "
        "or a bad list line, is a counted skip.")),
    out: str = typer.Option(..., "--out", help="Output folder for the sharded set."),
    split: str = typer.Option(None, help="`95/5` (or 90/5/5) by image hash, or `source`. Default: `source` "
                                         "when the input has train/ val/ test/ subfolders, else 95/5."),
    tokenizer: str = typer.Option(None, help="Local directory holding spiece.model, or a hub name such as "
                                             "google-t5/t5-base. Default: the small bundled test tokenizer."),
    shard_size: int = typer.Option(10_000, help="Samples per output shard."),
    workers: int = typer.Option(None, help="Processes that decode input tars (or chunks of a folder or list) "
                                           "and write the shards (default: the usable cores)."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take over --out's lock left by a run on "
                                                               "another host that is known to be dead."),
) -> None:
    """Tokenize captions, split, and write train, val (and test) shards with DALI indexes and manifest.json.

    --input takes fetch output (img2dataset tars), a folder of images with name.txt captions beside them, or a .csv / .jsonl list of path and caption: your own data needs no img2dataset.
    """
    from grr_data.infra.lock import LockedError
    from grr_data.infra.procs import Interrupted, stop_on_signals
    from grr_data.shard.run import shard_dataset
    from grr_data.shard.samples import InputError, ShardError
    from grr_data.tokenizer import TokenizerError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if tokenizer is None:
        typer.echo("note: using the bundled grr-sample-tokenizer (tests only); pass --tokenizer for real runs")
    try:
        # SIGTERM ends the run as Ctrl-C does: cleanup runs, the lock is released
        with stop_on_signals("the input tars finished so far are kept; rerun the same command to resume"):
            manifest, stats = shard_dataset(input, out, split=split, tokenizer=tokenizer, shard_size=shard_size,
                                            workers=workers, break_lock=break_lock)
    except Interrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(stop.exit_status) from None
    # OSError: the output cannot be written (permissions, full disk, a file in the way)
    except (InputError, ShardError, TokenizerError, LockedError, ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {out} in {stats['seconds']:.1f} s ({manifest['split_rule']}; tokenizer "
               f"{manifest['tokenizer']['name']}, vocab {manifest['tokenizer']['vocab_size']})")
    for name, info in manifest["splits"].items():
        typer.echo(f"  {name:5s} {info['num_samples']:>10,} samples in {len(info['shards'])} shards")
    skipped = ", ".join(f"{k} {v:,}" for k, v in manifest["skipped"].items()) or "none"
    typer.echo(f"  skipped: {skipped}")
    if manifest["damaged_tars"]:
        typer.echo(f"  damaged input tars: {manifest['damaged_tars']:,} (their lost samples are counted above)")
    typer.echo(f"  truncated captions {manifest['truncated_captions']:,}; duplicate images "
               f"{manifest['duplicate_images']:,}; resized images {manifest['resized_images']:,}")
    if stats["reused_tars"] or stats["kept_shards"]:
        typer.echo(f"  resumed: kept {stats['kept_shards']} shards and reused {stats['reused_tars']} input tars "
                   "from the interrupted run")
    for pair, count in manifest.get("overlapping_splits", {}).items():
        typer.echo(f"WARNING: {count:,} images are in both {pair} (split_mode {manifest['split_mode']!r}, as "
                   "fetched): validation on this set measures fitting, not generalisation", err=True)


@data_app.command("check")
def check(
    data_dir: str = typer.Argument(..., help="A sharded set (the folder holding manifest.json)."),
    workers: int = typer.Option(None, help="Processes reading and hashing shards (default: the usable cores); "
                                           "the report is the same for any number."),
) -> None:
    """Verify a sharded set against its manifest; exits 1 naming each file that does not match."""
    from grr_data.check import check_dataset

    try:
        report = check_dataset(data_dir, workers=workers)
    except (ValueError, OSError) as err:  # a URL this grr cannot read; a store that cannot be reached
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    for name, count in report.num_samples.items():
        typer.echo(f"  {name:5s} {count:>10,} samples")
    for warning in report.warnings:
        typer.echo(f"warning: {warning}")
    if report.ok:
        typer.echo(f"ok: {data_dir}: {report.num_shards} shards match manifest.json")
        return
    for problem in report.problems:
        typer.echo(f"FAIL {problem}", err=True)
    typer.echo(f"{len(report.problems)} problem(s) in {data_dir}", err=True)
    raise typer.Exit(1)
