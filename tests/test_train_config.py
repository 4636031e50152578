"""Training settings: recipes, --set parsing with type checks, config files, accumulation, resume rules."""

import json

import pytest

from grr_train.config import TrainConfig, parse_set, recipe, resolve_config, resume_config


def test_recipes_hold_the_paper_values():
    pre, fine = recipe("pretrain"), recipe("finetune")
    assert (pre.lambda_con, pre.lambda_cap, pre.dropout, pre.lr_max, pre.lr_min) == (2, 1, 0.15, 1e-4, 1e-6)
    assert (pre.warmup_steps, pre.global_batch_size, pre.epochs, pre.weight_decay) == (2000, 768, 21, 0.001)
    assert (fine.lambda_con, fine.lambda_cap, fine.dropout, fine.lr_max, fine.lr_min) == (1, 2, 0.1, 1e-5, 1e-7)
    assert fine.warmup_steps == 0 and fine.early_stop
    assert pre.accumulation_steps(4) == 4  # 48 x 4 x 4 = 768


def test_set_parses_types_and_rejects_bad_values():
    assert parse_set(["seed=3", "lambda_con=1", "compile=true", "max_steps=none", "loader=cpu"]) == {
        "seed": 3, "lambda_con": 1.0, "compile": "blocks", "max_steps": None, "loader": "cpu"}
    with pytest.raises(ValueError, match="expected a int"):
        parse_set(["seed=1.5"])
    with pytest.raises(ValueError, match="unknown setting 'sed'"):
        parse_set(["sed=1"])
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["seed"])


def test_resolve_order_and_validation(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"seed": 5, "dropout": 0.2}))
    cfg = resolve_config("pretrain", str(f), ["seed=7"], max_steps=9, preset=None)
    assert (cfg.seed, cfg.dropout, cfg.max_steps, cfg.preset) == (7, 0.2, 9, "grr-coca")
    with pytest.raises(ValueError, match="not a multiple"):
        TrainConfig(global_batch_size=100, per_device_batch_size=48).accumulation_steps(1)
    with pytest.raises(ValueError, match="--from"):
        resolve_config("finetune")
    f.write_text(json.dumps({"seed": "x"}))
    with pytest.raises(ValueError, match="seed"):
        resolve_config("pretrain", str(f))


def test_resume_changes_only_resumable_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": TrainConfig(seed=4).to_dict()}))
    cfg = resume_config(tmp_path, ["checkpoint_every=5"], max_steps=20)
    assert (cfg.seed, cfg.checkpoint_every, cfg.max_steps) == (4, 5, 20)
    with pytest.raises(ValueError, match="cannot change seed"):
        resume_config(tmp_path, ["seed=1"])


def finetune_cli_config(monkeypatch, tmp_path, *args) -> TrainConfig:
    """The TrainConfig `grr train finetune ARGS` would train with (training itself stubbed out)."""
    from typer.testing import CliRunner

    import grr_train.trainer
    from cli.main import app

    seen = []
    monkeypatch.setattr(grr_train.trainer, "run_training", lambda cfg, out, resume=False: seen.append(cfg))
    result = CliRunner().invoke(app, ["train", "finetune", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_finetune_cli_keeps_data_and_init_from_given_by_set_or_config(monkeypatch, tmp_path):
    cfg = finetune_cli_config(monkeypatch, tmp_path, "roco", "--from", "runs/pre")
    assert (cfg.data, cfg.init_from, cfg.dataset) == ("data/roco/shards", "runs/pre", "roco")  # the defaults
    cfg = finetune_cli_config(monkeypatch, tmp_path, "roco", "--set", "data=elsewhere", "--set", "init_from=runs/a")
    assert (cfg.data, cfg.init_from) == ("elsewhere", "runs/a")
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"data": "from-file", "init_from": "runs/b"}))
    cfg = finetune_cli_config(monkeypatch, tmp_path, "roco", "--config", str(f))
    assert (cfg.data, cfg.init_from) == ("from-file", "runs/b")
    cfg = finetune_cli_config(monkeypatch, tmp_path, "roco", "--config", str(f), "--data", "flag", "--from", "c")
    assert (cfg.data, cfg.init_from) == ("flag", "c")  # dedicated flags come last


def test_finetune_without_weights_says_how_to_give_them():
    with pytest.raises(ValueError, match="--from RUN_OR_CHECKPOINT, or --set init_from="):
        resolve_config("finetune", defaults={"data": "data/roco/shards"})


def test_loader_flag_sets_the_loader_setting(monkeypatch, tmp_path):
    cfg = finetune_cli_config(monkeypatch, tmp_path, "roco", "--from", "runs/pre")
    assert cfg.loader == "auto"
    cfg = finetune_cli_config(monkeypatch, tmp_path, "roco", "--from", "runs/pre", "--loader", "cpu")
    assert cfg.loader == "cpu"
    with pytest.raises(AssertionError, match="loader"):
        finetune_cli_config(monkeypatch, tmp_path, "roco", "--from", "runs/pre", "--loader", "gpu")
