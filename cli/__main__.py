"""`python -m cli ...`: the `grr` command where its script is not on PATH."""

from cli.main import app

app(prog_name="grr")
