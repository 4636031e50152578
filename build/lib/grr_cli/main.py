"""The root `grr` app: importing each command module registers its commands (see grr_cli.groups).
`grr --help` lists commands in the order they register: eval, compare, caption, embed, classify,
then demo."""

# isort: off
from grr_cli import evaluate, infer  # noqa: F401  (the modules register their commands)
from grr_cli import demo, export, fetch, loader, model, shard, train  # noqa: F401
# isort: on
from grr_cli.groups import app

if __name__ == "__main__":
    app()
