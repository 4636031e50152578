"""Checkpoint folders: atomic layout, `latest`, pruning, safe loading, RNG round trips, load_model."""

import json
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from ckpt_helpers import save_best, save_checkpoint

from grr_data.format.layout import SpecialIds
from grr_train.model import build_model, get_config
from grr_train.runs import checkpoint as ckpt
from grr_train.runs import rng, weights


def tiny_model():
    torch.manual_seed(0)
    cfg = get_config("grr-tiny", vocab_size=100, dropout=0.0)
    return cfg, build_model(cfg)


def meta(cfg, step):
    return {"step": step, "epoch": 0, "world_size": 1, "model_config": cfg.to_dict(),
            "train_config": {"recipe": "pretrain"}, "special": SpecialIds.for_vocab(100).to_dict()}


def test_save_prune_latest_and_load_model(tmp_path):
    cfg, model = tiny_model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, {"step": step, "x": torch.ones(2)}, meta(cfg, step), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002", "step-0000003"]  # no temporaries left behind
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000003"
    assert ckpt.load_state(ckpt.latest_checkpoint(tmp_path))["step"] == 3

    loaded, info = weights.load_model(tmp_path)
    assert info["step"] == 3 and info["special"] == SpecialIds.for_vocab(100)
    assert info["model_config"] == cfg
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # a checkpoint folder or its weights file work as well as the run folder
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoints" / "step-0000002" / "model.safetensors").name == \
        "step-0000002"


def test_best_is_preferred_and_missing_runs_are_explained(tmp_path):
    cfg, model = tiny_model()
    save_checkpoint(tmp_path, model, {}, meta(cfg, 5), keep=1)
    save_best(tmp_path, model, {}, meta(cfg, 4))
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "best"
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")


def test_state_refuses_arbitrary_objects(tmp_path):
    cfg, model = tiny_model()
    save_checkpoint(tmp_path, model, {"obj": Fraction(1, 3)}, meta(cfg, 1), keep=1)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        ckpt.load_state(ckpt.latest_checkpoint(tmp_path))


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.save(rng.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    rng.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_run_config_is_plain_json(tmp_path):
    cfg, _ = tiny_model()
    tokenizer = {"name": "sample", "vocab_size": 100, "pad": 0, "eos": 1, "bos": 98, "cls": 99}
    ckpt.write_run_config(tmp_path, cfg.to_dict(), {"seed": 0}, SpecialIds.for_vocab(100), tokenizer)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model"]["vocab_size"] == 100 and data["special"]["cls"] == 99
    assert data["tokenizer"] == tokenizer


def test_failed_save_leaves_no_partial_folder(tmp_path):
    cfg, model = tiny_model()
    save_checkpoint(tmp_path, model, {}, meta(cfg, 1), keep=3)
    with pytest.raises(Exception):  # noqa: B017  (whatever pickle raises for a lambda)
        save_checkpoint(tmp_path, model, {"bad": lambda: 0}, meta(cfg, 2), keep=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"


def test_sizes_are_recorded_and_a_torn_latest_falls_back(tmp_path, capsys):
    cfg, model = tiny_model()
    for step in (1, 2):
        save_checkpoint(tmp_path, model, {"step": step}, meta(cfg, step), keep=3)
    newest = tmp_path / "checkpoints" / "step-0000002"
    files = json.loads((newest / "meta.json").read_text())["files"]
    assert files["model.safetensors"]["size"] == (newest / "model.safetensors").stat().st_size
    with open(newest / "model.safetensors", "r+b") as f:  # as a crash before the data reached the disk
        f.truncate(100)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"
    assert "using step-0000001" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "step-0000001" / "state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no other checkpoint"):
        ckpt.latest_checkpoint(tmp_path)


def test_files_and_folders_are_fsynced_before_renaming(tmp_path, monkeypatch):
    import os

    synced, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    renamed = []
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), len(synced))), real_replace(a, b)))
    cfg, model = tiny_model()
    save_checkpoint(tmp_path, model, {}, meta(cfg, 1), keep=1)
    tmp_dir = next(a for a, _ in renamed if ".tmp-step" in a)
    synced_before = synced[: dict(renamed)[tmp_dir]]
    for name in ("model.safetensors", "state.pt", "meta.json", "SHA256SUMS", ""):
        assert os.path.join(tmp_dir, name).rstrip("/") in synced_before, name
    assert str(tmp_path / "checkpoints") in synced  # the renames themselves


def test_old_parameter_names_load_through_the_model_s_upgrade(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    cfg, model = tiny_model()
    save_checkpoint(tmp_path, model, {}, meta(cfg, 1), keep=1)
    folder = ckpt.latest_checkpoint(tmp_path)
    # as saved by an older model: every name under another prefix, one tensor split in two
    old = {f"old.{name}": t.clone() for name, t in model.state_dict().items()}
    split = next(name for name, t in old.items() if t.dim() == 2)
    old[split + ".a"], old[split + ".b"] = old.pop(split).chunk(2)
    save_file(old, str(folder / "model.safetensors"))
    monkeypatch.setattr(weights, "upgrade_state_dict", lambda state_dict: state_dict)
    with pytest.raises(ckpt.CheckpointError, match="does not fit the model.*missing.*unexpected"):
        weights.load_weights(build_model(cfg), folder)  # strict: nothing is silently left at random

    def upgrade(state_dict):
        joined = torch.cat([state_dict.pop(split + ".a"), state_dict.pop(split + ".b")])
        return {**{name.removeprefix("old."): t for name, t in state_dict.items()}, split[4:]: joined}

    monkeypatch.setattr(weights, "upgrade_state_dict", upgrade)
    loaded = build_model(cfg)
    weights.load_weights(loaded, folder)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    monkeypatch.setattr(weights, "upgrade_state_dict", lambda sd: {k: v for k, v in upgrade(sd).items()
                                                                          if k != split[4:]})
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        weights.load_weights(build_model(cfg), folder)


def test_rng_state_saves_only_this_rank_s_gpu(monkeypatch):
    # No GPU here: stand-ins record which device the CUDA generator calls name.
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or
                        torch.tensor([device.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, int(state))))
    state = rng.rng_state(torch.device("cuda", 1))
    rng.set_rng_state(state, torch.device("cuda", 1))
    assert calls == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 1), 1)]
    assert "cuda" not in rng.rng_state(torch.device("cpu"))
