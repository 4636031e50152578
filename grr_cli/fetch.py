"""`grr data fetch NAME`: dataset sources to img2dataset-format folders (grr_data.fetch does the work)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from grr_cli.groups import data_app
from grr_data.fetch import DATASETS, FetchError, FetchOptions, Interrupted, fetch, summary_lines


class Distributor(str, Enum):
    multiprocessing = "multiprocessing"
    pyspark = "pyspark"
    ray = "ray"


@data_app.command("fetch")
def fetch_command(
    name: str = typer.Argument(..., help=f"Dataset to fetch: {', '.join(DATASETS)}."),
    out: Path = typer.Option(None, "--out", help="Output folder (default: data/fetched/NAME)."),
    source: Path = typer.Option(None, "--from", help="Local source: TSV (cc12m), annotations folder or zip "
                                "(mscoco), archives folder (roco), images archive or folder (flickr30k)."),
    workers: int = typer.Option(None, help="img2dataset processes (default: one per usable CPU core)."),
    threads: int = typer.Option(None, help="Download threads per process (default: about 128 in all, "
                                "8 to 32 per process)."),
    distributor: Distributor = typer.Option(Distributor.multiprocessing, help="img2dataset distributor."),
    timeout: int = typer.Option(10, help="Seconds per download before it counts as failed."),
    retries: int = typer.Option(2, help="Download retries per image."),
    shard_size: int = typer.Option(10_000, help="Samples per output tar."),
    paper_split: bool = typer.Option(False, "--paper-split", help="roco: the paper's leaky split (val inside train)."),
    karpathy: Path = typer.Option(None, help="flickr30k: dataset_flickr30k.json; mscoco --split karpathy: "
                                  "dataset_coco.json (default: beside --from)."),
    split: str = typer.Option(None, help="mscoco: official (2017 train/val, the default) or karpathy "
                              "(113,287 / 5,000 / 5,000 images, as the retrieval literature reports)."),
    img2dataset_option: list[str] = typer.Option(None, "--img2dataset-option", help="key=value passed to "
                                                 "img2dataset's download(), e.g. min_image_size=64; repeatable."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="cc12m: fetch the failed URLs of the "
                                      "finished fetch in --out once more and add them to it."),
    num_pairs: int = typer.Option(None, "--num-pairs", help="shapes: how many image-caption pairs to draw "
                                  "(default 2000; about 10% go to val, 10% to test)."),
    seed: int = typer.Option(None, help="shapes: the seed the pairs are drawn from (default 0)."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take over --out's lock left by a fetch on "
                                                               "another host that is known to be dead."),
) -> None:
    """Fetch a dataset into 288-px JPEG shards with captions; resumable: rerun to continue."""
    options = FetchOptions(out=out or Path("data/fetched") / name, source=source, workers=workers,
                           threads=threads, distributor=distributor.value, timeout=timeout, retries=retries,
                           shard_size=shard_size, paper_split=paper_split, karpathy=karpathy,
                           num_pairs=num_pairs, seed=seed, split=split,
                           img2dataset_options=list(img2dataset_option or []), retry_failed=retry_failed,
                           break_lock=break_lock)
    try:
        data = fetch(name, options)
    except FetchError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    except Interrupted as stop:  # Ctrl-C or SIGTERM: 130 or 143, what a shell reports, so `fetch && shard` stops
        typer.secho(str(stop), fg=typer.colors.RED, err=True)
        raise typer.Exit(stop.exit_status) from None
    for line in summary_lines(data):
        typer.echo(line)
    typer.echo(f"  wrote {options.out / 'fetch_manifest.json'}")
