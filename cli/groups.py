"""The command groups; each cli module adds its commands to one of these."""

import typer

model_app = typer.Typer(help="Model presets, parameter counts and FLOPs.", no_args_is_help=True)
data_app = typer.Typer(help="Fetch datasets, shard them, check shards.", no_args_is_help=True)
train_app = typer.Typer(help="Pretrain and fine-tune (DDP).", no_args_is_help=True)
bench_app = typer.Typer(help="Throughput benchmarks.", no_args_is_help=True)
