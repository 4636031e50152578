"""Training settings: recipes, --set parsing with type checks, config files, accumulation, resume rules,
a description for every setting, and plan_run's checks and resume decision."""

import json
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from grr_train.train.config import SETTING_HELP, TrainConfig, recipe, settings_table
from grr_train.train.settings import parse_set, plan_run, resolve_config, resume_config

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

from grr_train.train.plan import BatchPlan  # noqa: E402


def test_recipes_hold_the_paper_values():
    pre, fine = recipe("pretrain"), recipe("finetune")
    assert (pre.lambda_con, pre.lambda_cap, pre.dropout, pre.lr_max, pre.lr_min) == (2, 1, 0.15, 1e-4, 1e-6)
    assert (pre.warmup_steps, pre.global_batch_size, pre.epochs, pre.weight_decay) == (2000, 768, 21, 0.001)
    assert (fine.lambda_con, fine.lambda_cap, fine.dropout, fine.lr_max, fine.lr_min) == (1, 2, 0.1, 1e-5, 1e-7)
    assert fine.warmup_steps == 0 and fine.early_stop
    plan = BatchPlan.for_run(pre, 4)
    assert (plan.micro_batch, plan.accumulation, plan.contrastive_batch) == (48, 4, 192)  # 48 x 4 x 4 = 768


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
        BatchPlan.for_run(TrainConfig(global_batch_size=100, per_device_batch_size=48), 1)
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
    """The TrainConfig `grr train finetune ARGS` would train with (training itself stubbed out), run
    in tmp_path, where every --from and data folder the tests name exists (they are checked first)."""
    from typer.testing import CliRunner

    import grr_train.train.trainer
    from grr_cli.main import app

    monkeypatch.chdir(tmp_path)
    for run in ("runs/pre", "runs/a", "runs/b", "c"):
        (tmp_path / run).mkdir(parents=True, exist_ok=True)
    for data in ("data/roco/shards", "elsewhere", "from-file", "flag"):
        if not (tmp_path / data / "manifest.json").exists():
            make_shardset(tmp_path / data, shard_sizes=(2,))
    seen = []
    monkeypatch.setattr(grr_train.train.trainer, "run_training", lambda cfg, out, resume=False: seen.append(cfg))
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


def test_every_setting_has_a_one_line_description():
    names = [f.name for f in fields(TrainConfig)]
    assert sorted(SETTING_HELP) == sorted(names)  # a new field needs its line in SETTING_HELP
    assert all(text and "\n" not in text for text in SETTING_HELP.values())
    rows = {name: (pre, fine) for name, pre, fine, _ in settings_table()}
    assert rows["lr_max"] == ("0.0001", "1e-05") and rows["seed"] == ("0", None)
    assert rows["early_stop"] == ("false", "true") and rows["max_steps"] == ("none", None)


def test_unknown_preset_is_refused_by_validation():
    with pytest.raises(ValueError, match="unknown preset 'grr-huge'; known: .*grr-tiny"):
        resolve_config("pretrain", preset="grr-huge")


def test_resume_accepts_a_config_file_that_changes_nothing_else(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": TrainConfig(seed=4).to_dict()}))
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"seed": 4, "max_steps": 8}))
    assert resume_config(tmp_path, config_file=str(same)).max_steps == 8
    same.write_text(json.dumps({"seed": 5}))
    with pytest.raises(ValueError, match="cannot change seed"):
        resume_config(tmp_path, config_file=str(same))


def test_plan_run_auto_decides_on_checkpoints(tmp_path):
    data = make_shardset(tmp_path / "data", shard_sizes=(2,))
    run = tmp_path / "run"
    cfg, resume, note = plan_run("pretrain", run, "auto", data=str(data))
    assert not resume and note is None and cfg.data == str(data)  # no folder: a new run, nothing to say
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict()}))
    cfg, resume, note = plan_run("pretrain", run, "auto", data=str(data))
    assert not resume and "no checkpoint" in note and "starting fresh" in note
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step-0000001")  # names a checkpoint that is not there
    with pytest.raises(FileNotFoundError, match="no other checkpoint"):
        plan_run("pretrain", run, "auto", data=str(data))
    with pytest.raises(ValueError, match="expected one of no, yes, auto"):
        plan_run("pretrain", run, "maybe")


def test_plan_run_refuses_a_run_of_the_other_recipe(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": TrainConfig().to_dict()}))
    with pytest.raises(ValueError, match="holds a pretrain run, not a finetune one"):
        plan_run("finetune", tmp_path, "yes")


@pytest.mark.parametrize("fields, message", [
    (dict(recipe="train"), "recipe must be one of ('pretrain', 'finetune'), got 'train'"),
    (dict(preset="grr-huge"), "unknown preset 'grr-huge'; known: "),
    (dict(precision="fp16"), "precision must be one of ('auto', 'fp32', 'bf16'), got 'fp16'"),
    (dict(loader="gpu"), "loader must be one of ('auto', 'dali', 'cpu'), got 'gpu'"),
    (dict(compile="yes"), "compile must be one of ('auto', 'off', 'blocks', 'regions', 'model'), got 'yes'"),
    (dict(parallelism="zero3"), "parallelism must be one of ('ddp', 'fsdp'), got 'zero3'"),
    (dict(parallelism="fsdp", compile="model"), "compile=model does not combine with parallelism=fsdp"),
    (dict(trim_text_padding=True, compile="model"), "trim_text_padding=true reads each micro-batch's caption length on the host"),
    (dict(per_device_batch_size=0), "per_device_batch_size must be at least 1, got 0"),
    (dict(lr_cycle_steps=0), "lr_cycle_steps must be at least 1, got 0"),
    (dict(num_workers=-1), "num_workers must be >= 0, got -1"),
    *[(dict([(name, 0)]), f"{name} must be at least 1, got 0") for name in (
        "global_batch_size", "contrastive_batch_size", "epochs", "val_batch_size", "val_contrastive_batch_size",
        "checkpoint_every", "keep_checkpoints", "patience_per_level", "num_lr_levels")],
    (dict(max_steps=-1), "max_steps must be >= 0, got -1"),
    (dict(lr_min=1e-3, lr_max=1e-4), "need 0 <= lr_min <= lr_max, got 0.001 and 0.0001"),
    (dict(lr_min=-1e-6), "need 0 <= lr_min <= lr_max, got -1e-06 and 0.0001"),
    (dict(recipe="finetune"), "fine-tuning needs the weights to start from (--from RUN_OR_CHECKPOINT"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_train_config_refuses(fields, message):
    import re

    TrainConfig().validate()  # the defaults are valid: each case is refused for its own field
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        TrainConfig(**fields).validate()
