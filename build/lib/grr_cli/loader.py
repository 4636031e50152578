"""`grr bench loader`: loader throughput and CPU use (library: grr_data.loader.bench)."""

import typer

from grr_cli.groups import bench_app


@bench_app.command("loader")
def bench_loader_cmd(
    data_dir: str = typer.Argument(..., help="A sharded set (made by `grr data shard`)."),
    loader: str = typer.Option("cpu", "--loader", help="cpu, dali or auto."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(2, "--workers", help="CPU loader workers; DALI threads."),
    batches: int = typer.Option(50, "--batches", help="Batches to read (epochs repeat if needed)."),
    split: str = typer.Option("train", "--split"),
    device: str = typer.Option(None, "--device", help="Default: cuda when present for dali, else cpu."),
    draft: bool = typer.Option(True, "--draft/--no-draft", help="CPU loader: JPEG draft mode."),
):
    """Read batches as fast as possible; print images/s and CPU cores used."""
    from grr_data.infra.pil_info import describe_pil_build
    from grr_data.loader.bench import bench_loader

    options = {"draft": draft} if loader == "cpu" else {}
    r = bench_loader(data_dir, loader, batch_size, workers, batches, split, device, **options)
    typer.echo(
        f"loader {r['loader']}, device {r['device']}: {r['images_per_s']:.0f} images/s, {r['cores']:.2f} cores, "
        f"{r['cpu_ms_per_image']:.1f} CPU ms/image "
        f"(batch {r['batch_size']}, workers {r['workers']}, {r['batches']} batches, "
        f"start-up {r['startup_s']:.2f} s, skipped {r['skipped'] or 0})"
    )
    if r["loader"] == "cpu":  # which JPEG decoder the figure is for (pillow-simd or Pillow)
        typer.echo(describe_pil_build())
