"""Every `grr` command answers --help (rich markup in a docstring can break it) and lists its group;
the training commands' flags read as flags; `grr train settings` lists every setting; `grr --version`
and `python -m grr_cli` work."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grr_cli.main import app

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = [
    [], ["model"], ["model", "list"], ["model", "summary"], ["data"], ["data", "fetch"],
    ["data", "shard"], ["data", "check"], ["train"], ["train", "pretrain"], ["train", "finetune"],
    ["train", "settings"],
    ["bench"], ["bench", "loader"], ["bench", "train"], ["eval"], ["caption"], ["embed"], ["classify"],
    ["compare"], ["export"], ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "grr")
def test_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.parametrize("command", [["train", "pretrain"], ["train", "finetune"], ["bench", "train"]])
def test_training_flags_read_as_flags(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    flags = {"--resume", "--auto-resume"} if command[0] == "train" else {"--activation-checkpointing", "--count-ops",
                                                                         "--json"}
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.strip("│ ").startswith("--")}
    assert flags <= set(lines), result.output
    for flag in flags:
        assert "<bool>" not in lines[flag] and "--no-" not in lines[flag], lines[flag]  # no value, no negation
    # training settings are --set KEY=VALUE; the benchmark takes them too (the speed levers, issue 19)
    assert "--set" in lines and "KEY=VALUE" in lines["--set"], result.output
    if command[0] == "train":
        assert "`grr train settings` lists the names, defaults and meanings" in lines["--set"]


def test_train_settings_lists_every_setting_with_defaults():
    from dataclasses import fields

    from grr_train.train.config import SETTING_HELP, TrainConfig

    result = CliRunner().invoke(app, ["train", "settings"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for f in fields(TrainConfig):
        assert f.name in rows and SETTING_HELP[f.name] in rows[f.name], f.name
    assert rows["lr_max"].split(SETTING_HELP["lr_max"])[0].split()[1:] == ["0.0001", "(finetune", "1e-05)"]
    assert rows["seed"].split()[1] == "0"
    assert rows["lambda_cap"].split()[:4] == ["lambda_cap", "1.0", "(finetune", "2.0)"]
    assert rows["lambda_cap"].endswith("weight of the captioning loss (eq. 6)")
    assert rows["weight_decay"].split()[:2] == ["weight_decay", "0.001"]


def test_version_is_the_distributions():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"grr {version}\n", result.output


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "grr_cli", "--version"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("grr "), result.stderr
    listed = subprocess.run([sys.executable, "-m", "grr_cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, env={"COLUMNS": "120", "PATH": ""})
    assert "Usage: grr " in listed.stdout and "classify" in listed.stdout, listed.stderr
