"""`--config FILE` in JSON, TOML or YAML (flat, or under `train` as a run's config.json is, so that
one serves as a template), and did-you-mean for mistyped settings, presets and fine-tuning's DATASET."""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grr_cli.main import app
from grr_train.train.settings import load_config_file, plan_run, resolve_config

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

EXPECTED = {"seed": 7, "lr_max": 0.0003, "max_steps": None, "trim_text_padding": True, "preset": "grr-tiny",
            "wandb_project": None}


@pytest.mark.parametrize("name, text", [
    ("s.json", '{"seed": 7, "lr_max": 3e-4, "max_steps": null, "trim_text_padding": true, "preset": "grr-tiny", '
               '"wandb_project": null}'),
    ("s.toml", 'seed = 7\nlr_max = 3e-4\nmax_steps = "none"\ntrim_text_padding = true\npreset = "grr-tiny"\n'
               'wandb_project = "none"\n'),
    ("t.toml", '[train]\nseed = 7\nlr_max = 0.0003\nmax_steps = "none"\ntrim_text_padding = true\n'
               'preset = "grr-tiny"\nwandb_project = "none"\n'),
    # YAML 1.1 reads 3e-4 (no dot) as text: parsed as --set parses it
    ("s.yaml", "seed: 7\nlr_max: 3e-4\nmax_steps: null\ntrim_text_padding: yes\npreset: grr-tiny\n"
               "wandb_project: ~\n"),
    ("s.yml", "train:\n  seed: 7\n  lr_max: 0.0003\n  max_steps:\n  trim_text_padding: true\n  preset: grr-tiny\n"
              "  wandb_project: null\n"),
])
def test_json_toml_and_yaml_give_the_same_settings(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert load_config_file(path) == EXPECTED


def test_a_runs_config_json_is_a_template(tmp_path):
    cfg = resolve_config("pretrain", sets=["preset=grr-tiny", "seed=5", "lr_max=2e-4", "val_every=10"])
    # what the trainer writes into RUN/config.json (grr_train/runs/checkpoint.write_run_config)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"dim": 8}, "train": cfg.to_dict(), "special": {}}))
    again = resolve_config("pretrain", str(tmp_path / "config.json"), sets=["seed=6"])
    assert asdict(again) == {**asdict(cfg), "seed": 6}


@pytest.mark.parametrize("name, text, expected", [
    ("bad.yaml", "seed: [3\n", "cannot read a YAML mapping (while parsing a flow sequence"),
    ("bad.toml", "seed = \n", "cannot read a TOML table (Invalid value"),
    ("list.yaml", "- seed\n", "expected a YAML mapping of settings, got list"),
    ("yaml.json", "seed: 3\n", "cannot read a JSON object (Expecting value: line 1 column 1 (char 0)); settings "
                               "files are JSON, TOML (.toml) or YAML (.yaml, .yml)"),
    ("typo.toml", "sed = 3\nlr_mx = 1.0\n", "unknown settings lr_mx (did you mean 'lr_max'?), sed (did you mean 'seed'?)"),
    ("type.yaml", "seed: three\n", "--config"),
])
def test_a_bad_settings_file_is_named_with_what_is_wrong(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config_file(path)
    assert str(err.value).startswith(f"--config {path}: ")
    assert expected in str(err.value)


def test_yaml_config_through_the_cli(tmp_path, monkeypatch):
    """The command reads the YAML file (today's 'Expecting value: line 1 column 1' is gone) and goes on to the data."""
    (tmp_path / "run.yaml").write_text("preset: grr-tiny\nseed: 3\n")
    result = CliRunner().invoke(app, ["train", "pretrain", "--config", str(tmp_path / "run.yaml"),
                                      "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: {tmp_path / 'nodata' / 'manifest.json'} not found: is "
                                     f"{tmp_path / 'nodata'} a sharded set (grr data shard)?")


def fetched_set(root: Path, dataset: str) -> Path:
    make_shardset(root, shard_sizes=(4,), split="train")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["fetch_manifest"] = {"dataset": dataset}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_finetune_dataset_must_be_the_set_it_names(tmp_path, monkeypatch):
    data = fetched_set(tmp_path / "data" / "shapes" / "shards", "shapes")
    (tmp_path / "pre").mkdir()
    plan = dict(run_dir=tmp_path / "fine", defaults={"data": "data/shapez/shards"})
    with pytest.raises(ValueError, match=r"^DATASET 'shapez' \(did you mean 'shapes'\?\), but .* holds the 'shapes' "
                                         r"set \(grr data fetch shapes\): pass shapes as DATASET"):
        plan_run("finetune", data=str(data), fresh_only={"dataset": "shapez", "init_from": str(tmp_path / "pre")},
                 **plan)
    cfg, _, _ = plan_run("finetune", data=str(data), fresh_only={"dataset": "shapes",
                                                                 "init_from": str(tmp_path / "pre")}, **plan)
    assert cfg.dataset == "shapes"
    # without --data, DATASET's data/DATASET/shards: a missing one names the local set closest to it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"data/shapez/shards a sharded set \(grr data shard\)\? "
                                         r"\(did you mean 'shapes'\?\)$"):
        plan_run("finetune", fresh_only={"dataset": "shapez", "init_from": "pre"}, **plan)


def test_a_set_of_ones_own_takes_any_dataset_name(tmp_path):
    data = make_shardset(tmp_path / "own", shard_sizes=(4,), split="train") or tmp_path / "own"
    (tmp_path / "pre").mkdir()
    cfg, _, _ = plan_run("finetune", tmp_path / "fine", data=str(data),
                         fresh_only={"dataset": "my-xrays", "init_from": str(tmp_path / "pre")})
    assert cfg.dataset == "my-xrays"
