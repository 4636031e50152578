"""Checkpoint folders: atomic layout, `latest`, pruning, safe loading, RNG round trips, load_model."""

import json
import random
import threading
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
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock' object"):  # what torch.save raises
        save_checkpoint(tmp_path, model, {"bad": threading.Lock()}, meta(cfg, 2), keep=3)
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


def old_layout(state: dict) -> dict:
    """`state` as the model before issue 9 named it, written out here from that layout: each
    self-attention (ViT blocks, both decoders' self_attn) had `q` (D x D) and `kv` (2D x D) where
    today there is one `qkv` (3D x D) whose rows are q's, then k's and v's; cross-attention kept
    its q and kv."""
    old = {}
    for name, tensor in state.items():
        if ".qkv." in name:
            width = tensor.shape[0] // 3
            old[name.replace(".qkv.", ".q.")] = tensor[:width].clone()
            old[name.replace(".qkv.", ".kv.")] = tensor[width:].clone()
        else:
            old[name] = tensor.clone()
    return old


def reseal(folder) -> None:
    """What a save writes after the files: meta.json's sizes and SHA256SUMS, for files edited here."""
    import hashlib

    record = json.loads((folder / "meta.json").read_text())
    for name in record["files"]:
        record["files"][name]["size"] = (folder / name).stat().st_size
    (folder / "meta.json").write_text(json.dumps(record))
    names = [*record["files"], "meta.json"]
    (folder / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
                                               for n in names))


def test_old_layout_weights_load_bit_equal_through_the_real_upgrade(tmp_path):
    from safetensors.torch import save_file

    cfg, model = tiny_model()
    current = {name: t.clone() for name, t in model.state_dict().items()}
    old = old_layout(current)
    merged = [n for n in current if ".qkv." in n]
    assert len(merged) == 2 * (cfg.depth + cfg.text_depth + cfg.multimodal_depth)  # weight and bias each
    assert not any(".qkv." in n for n in old) and any(n.endswith("cross_attn.kv.weight") for n in old)
    save_checkpoint(tmp_path, model, {}, meta(cfg, 1), keep=1)
    folder = ckpt.latest_checkpoint(tmp_path)
    save_file(old, str(folder / "model.safetensors"))
    reseal(folder)
    assert ckpt.checkpoint_problem(folder) is None
    loaded, _ = weights.load_model(tmp_path)  # grr eval, grr caption and finetune --from load this way
    assert loaded.state_dict().keys() == current.keys()
    for name, tensor in current.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    # strict: an old checkpoint missing one of a pair is refused, not loaded with a weight left at random
    del old["unimodal.blocks.1.self_attn.kv.bias"]
    save_file(old, str(folder / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit the model CoCa: missing "
                                                   r"\['unimodal.blocks.1.self_attn.qkv.bias'\], unexpected "
                                                   r"\['unimodal.blocks.1.self_attn.q.bias'\]"):
        weights.load_weights(build_model(cfg), folder)


def test_an_old_layout_run_is_refused_for_resume_and_names_what_to_do(tmp_path):
    import sys
    from dataclasses import replace
    from pathlib import Path

    from safetensors.torch import save_file

    from grr_train.train.config import TrainConfig
    from grr_train.train.settings import resume_config
    from grr_train.train.trainer import run_training

    sys.path.insert(0, str(Path(__file__).parent))
    from shardset import make_shardset

    data = make_shardset(tmp_path / "data", (4,), split="train")
    run = tmp_path / "run"
    run_training(replace(TrainConfig(), preset="grr-tiny", data=str(data), per_device_batch_size=4, global_batch_size=4,
                         max_steps=1, num_workers=0, loader="cpu", val_split="none", tensorboard=False), run)
    folder = ckpt.latest_checkpoint(run)
    model, _ = weights.load_model(run)
    save_file(old_layout(model.state_dict()), str(folder / "model.safetensors"))
    reseal(folder)
    with pytest.raises(ValueError, match=rf"{run} was saved before attention's q, k and v became one projection: its "
                                         r"weights load for grr eval, grr caption and finetune --from, but its "
                                         r"optimizer state cannot resume; fine-tune from it \(--from\) instead"):
        run_training(resume_config(run, max_steps=2), run, resume=True)
    loaded, _ = weights.load_model(run)  # what the message offers still works
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in model.state_dict().items())


def test_checkpoint_format_version_is_written_and_checked(tmp_path):
    cfg, model = tiny_model()
    folder = save_checkpoint(tmp_path, model, {}, meta(cfg, 1), keep=1)
    record = json.loads((folder / "meta.json").read_text())
    assert record["format_version"] == 1
    record["format_version"] = 2  # a checkpoint from a newer grr
    (folder / "meta.json").write_text(json.dumps(record))
    reseal(folder)
    with pytest.raises(ckpt.CheckpointError, match=rf"{folder}: checkpoint format 2, expected 1"):
        weights.load_model(folder)


def test_a_malformed_checksum_line_makes_the_checkpoint_unusable(tmp_path, capsys):
    cfg, model = tiny_model()
    for step in (1, 2):
        save_checkpoint(tmp_path, model, {"step": step}, meta(cfg, step), keep=2)
    folder = tmp_path / "checkpoints" / "step-0000002"
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    lines[1] = lines[1].replace("  ", " ", 1)  # one space: not `sha256sum -c` format
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert ckpt.checkpoint_problem(folder) == (f"cannot read {folder / 'SHA256SUMS'} ({folder / 'SHA256SUMS'}:2 is "
                                               "not a 'SHA-256  name' line)")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"
    assert "using step-0000001" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="SHA256SUMS:2 is not a 'SHA-256  name' line"):
        ckpt.resolve_checkpoint(folder)


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
