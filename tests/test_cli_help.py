"""Every `grr` command answers --help (rich markup in a docstring can break it) and lists its group."""

import pytest
from typer.testing import CliRunner

from cli.main import app

COMMANDS = [
    [], ["model"], ["model", "list"], ["model", "summary"], ["data"], ["data", "fetch"],
    ["data", "shard"], ["data", "check"], ["train"], ["train", "pretrain"], ["train", "finetune"],
    ["bench"], ["bench", "loader"], ["bench", "train"], ["eval"], ["caption"], ["compare"], ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "grr")
def test_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
