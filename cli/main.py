"""The root `grr` app: imports every command module so it registers its commands."""

import typer

from cli import evaluate, fetch, loader, model, shard, train  # noqa: F401  (they register commands)
from cli.groups import bench_app, data_app, model_app, train_app

app = typer.Typer(help="GRR-CoCa: data, training and evaluation.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(bench_app, name="bench")
evaluate.register(app)

if __name__ == "__main__":
    app()
