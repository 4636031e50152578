"""`grr export`: a run as a Hugging Face folder that `from_pretrained` loads back to the same
model, bit for bit on the CPU; its model card; a push without network fails in one line.
(transformers' Auto classes on an export: tests/test_export_hf.py.)"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_run import make_set, photos, tiny_config, train_validated_run  # noqa: E402

from grr_cli.main import app  # noqa: E402
from grr_train.infer.export import HubCoCa, export_run  # noqa: E402
from grr_train.runs.weights import load_model  # noqa: E402
from grr_train.train.config import TrainConfig  # noqa: E402
from grr_train.train.trainer import run_training  # noqa: E402

CODE_FILES = ["grr_data_format_layout.py", "grr_infer_generate.py", "grr_model_attention.py", "grr_model_coca.py",
              "grr_model_config.py", "grr_model_ffn.py", "grr_model_head_loss.py", "grr_model_norms.py",
              "grr_model_poolers.py", "grr_model_posembed.py", "grr_model_rope.py", "grr_model_text.py", "grr_model_vit.py",
              "modeling_grr_coca.py"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(the folder everything is in, a tiny run of 2 steps validated at step 2)."""
    root = tmp_path_factory.mktemp("export")
    data, _ = make_set(root)
    return root, train_validated_run(data, root / "run")


@pytest.fixture(scope="module")
def run(made):
    return made[1]


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path_factory.mktemp("out") / "model")])
    assert result.exit_code == 0, result.output
    return Path(result.output.split(" to ")[-1].strip())


def test_export_writes_the_hugging_face_layout(run, exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(["README.md", "config.json", "model.safetensors",
                                                                "spiece.model", "tokenizer_config.json", *CODE_FILES])
    assert (exported / "spiece.model").read_bytes() == (run / "tokenizer" / "spiece.model").read_bytes()
    config = json.loads((exported / "config.json").read_text())
    meta = json.loads((run / "checkpoints" / "step-0000002" / "meta.json").read_text())
    assert config["model_config"] == meta["model_config"] and config["special"] == meta["special"]
    assert config["tokenizer"]["run_copy"]["files_sha256"] == meta["tokenizer"]["files_sha256"]
    assert config["source"] | {"epoch": None} == {"format": 1, "run": "run", "checkpoint": "step-0000002", "step": 2,
                                                  "epoch": None, "preset": "grr-tiny", "recipe": "pretrain"}
    assert config["model_type"] == "grr_coca" and config["architectures"] == ["GrrCocaModel"]
    assert config["auto_map"] == {"AutoConfig": "modeling_grr_coca.GrrCocaConfig",
                                  "AutoModel": "modeling_grr_coca.GrrCocaModel"}
    tok = json.loads((exported / "tokenizer_config.json").read_text())
    assert (tok["tokenizer_class"], tok["bos_token"], tok["cls_token"]) == ("T5Tokenizer", "<bos>", "<cls>")


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == kind]


def test_model_card_says_what_the_model_is(made, run, exported):
    card = (exported / "README.md").read_text()
    model, _ = load_model(run)
    last_train, val = _records(run, "train")[-1], _records(run, "val")[-1]
    root = made[0].name
    assert card.startswith("---\nlibrary_name: grr-coca\nlicense: apache-2.0\n")
    assert ("| preset | `grr-tiny`: ViT with rmsnorm, geglu feed-forward, rope1d positions; width 64, 2 ViT blocks, "
            "2 + 2 text decoder blocks, 288-px images |") in card
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card
    assert f"| data | `{root}/data`: train 8 image-caption pairs |" in card
    assert "| steps | 2 optimizer steps of 4 pairs (8 pairs seen), epoch 1 |" in card
    assert "| recipe | pretrain: lr 0.001 -> 0.0001, warmup 1 steps" in card
    assert val["step"] == 2 and f"| validation at these weights | train | 2 | loss {val['loss']:.4g}, " in card
    assert f"perplexity {val['perplexity']:.4g}" in card
    assert f"| last training step | train | 2 | loss {last_train['loss']:.4g}, " in card
    assert "## Licence\n\nApache-2.0" in card and "eprint        = {2507.18009}" in card
    assert 'pip install torch "transformers>=5,<6" sentencepiece protobuf pillow' in card
    assert f'"data": "{root}/data"' in card  # the training config too
    assert str(made[0].parent) not in card and str(Path.home()) not in card  # no local path anywhere


def test_card_of_a_run_that_was_not_validated(made, tmp_path):
    run_training(tiny_config(made[0] / "data"), tmp_path / "plain")
    card = (export_run(tmp_path / "plain", tmp_path / "out") / "README.md").read_text()
    assert "The run was not validated" in card and "| last training step | train | 1 | loss " in card


def test_preset_of_a_model_config():
    import dataclasses

    from grr_train.model.config import PRESETS, preset_of

    for name, preset in PRESETS.items():  # whatever the data and recipe set
        assert preset_of(dataclasses.replace(preset, vocab_size=588, pad_id=0, eos_id=1, dropout=0.1)) == name, name
    assert preset_of(PRESETS["grr-tiny"].to_dict()) == "grr-tiny"
    assert preset_of(dataclasses.replace(PRESETS["grr-tiny"], width=96, heads=4)) is None  # no preset is this shape


def test_finetune_records_the_preset_of_its_from_run(made, tmp_path):
    """A fine-tuned grr-tiny run was recorded (and exported) as the default preset, grr-coca."""
    # `grr train finetune` leaves `preset` at its default, which the run used to record
    cfg = replace(tiny_config(made[0] / "data"), recipe="finetune", init_from=str(made[1]), preset="grr-coca")
    assert TrainConfig().preset == "grr-coca"
    run_training(cfg, tmp_path / "fine")
    assert json.loads((tmp_path / "fine" / "config.json").read_text())["train"]["preset"] == "grr-tiny"
    card = (export_run(tmp_path / "fine", tmp_path / "out") / "README.md").read_text()
    assert "| preset | `grr-tiny`:" in card and f"| recipe | finetune from `{made[0].name}/run`:" in card


def test_from_pretrained_gives_identical_logits(run, exported, tmp_path):
    reference, info = load_model(run)
    loaded = HubCoCa.from_pretrained(exported)
    assert not loaded.training and isinstance(loaded, HubCoCa)
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    from grr_data.loader import preprocess_image
    from grr_data.tokenizer import load_tokenizer

    images = torch.stack([preprocess_image(p) for p in photos(tmp_path / "photos")])
    ids = torch.from_numpy(load_tokenizer(exported).encode_batch(["a red dog", "two cats", "a car on a street"])[0])
    with torch.no_grad():
        want, got = reference(images, ids), loaded(images, ids)
    for name in ("logits", "image_embed", "text_embed"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_a_missing_weight_is_refused_not_left_random(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "spiece.model"):
        (broken / f).write_bytes((exported / f).read_bytes())
    weights = load_file(exported / "model.safetensors")
    weights.pop("lm_head.bias")
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(RuntimeError, match="lm_head.bias"):
        HubCoCa.from_pretrained(broken)


def test_export_refuses_a_folder_in_use(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out exists and is not empty; choose another --out"):
        export_run(run, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_export_of_a_checkpoint_folder(run, tmp_path):
    out = export_run(run / "checkpoints" / "step-0000002", tmp_path / "ckpt-export")
    assert json.loads((out / "config.json").read_text())["source"]["run"] == "run"
    assert (out / "spiece.model").is_file()


def _push(run, tmp_path):
    return CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "pushed"), "--push", "me/grr-tiny"])


def test_push_offline_fails_in_one_line(run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = _push(run, tmp_path)
    assert result.exit_code == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"error: could not push {tmp_path / 'pushed'} to the hub repo 'me/grr-tiny' (")
    assert "pushing needs network access and a token" in errors[0]
    assert (tmp_path / "pushed" / "model.safetensors").is_file()  # the export itself is complete


def test_push_without_a_reachable_hub_fails_in_one_line(run, tmp_path, monkeypatch):
    """Not offline mode: the hub refuses the connection (nothing listens on port 9)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = _push(run, tmp_path)
    assert result.exit_code == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "could not push" in errors[0] and "network access" in errors[0], result.output


def test_export_help():
    result = CliRunner().invoke(app, ["export", "--help"])
    assert result.exit_code == 0 and "--push" in result.output


@pytest.mark.slow
def test_an_export_from_before_the_transformers_fields_still_loads(run, exported, tmp_path):
    """What `grr export` wrote before: config.json of HubCoCa's arguments only, no code, no
    tokenizer_config.json. grr loads it as before, in Python and in `grr caption --ckpt`."""
    import shutil

    import grr_train.api as grr

    old = tmp_path / "old-export"
    old.mkdir()
    for name in ("model.safetensors", "spiece.model", "README.md"):
        shutil.copy(exported / name, old / name)
    config = json.loads((exported / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: config[k] for k in ("model_config", "special", "tokenizer",
                                                                        "source")}))
    images = photos(tmp_path / "photos", 2)
    assert grr.load(old).caption(images, beams=2) == grr.load(run).caption(images, beams=2)
    by_run, by_old = (CliRunner().invoke(app, ["caption", *map(str, images), "--ckpt", str(folder), "--device", "cpu"])
                      for folder in (run, old))
    assert by_old.exit_code == 0 and by_old.stdout == by_run.stdout, by_old.output


def test_a_run_fine_tuned_before_the_fix_is_exported_with_its_models_preset(made, tmp_path, monkeypatch):
    """A run that recorded the default preset (what fine-tuning did before) is carded as the preset
    its model's architecture is."""
    from grr_train.train import setup as run_checks

    build = run_checks.build_run_model
    monkeypatch.setattr(run_checks, "build_run_model", lambda cfg, *args: (*build(cfg, *args)[:2], cfg))
    cfg = replace(tiny_config(made[0] / "data"), recipe="finetune", init_from=str(made[1]), preset="grr-coca")
    run_training(cfg, tmp_path / "old")
    assert json.loads((tmp_path / "old" / "config.json").read_text())["train"]["preset"] == "grr-coca"
    out = export_run(tmp_path / "old", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["source"]["preset"] == "grr-tiny"
    assert "| preset | `grr-tiny`:" in (out / "README.md").read_text()
