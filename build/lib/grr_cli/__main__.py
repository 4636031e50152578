"""`python -m grr_cli ...`: the `grr` command where its script is not on PATH."""

from grr_cli.main import app

app(prog_name="grr")
