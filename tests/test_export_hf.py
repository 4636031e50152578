"""An export is a Hugging Face folder that transformers loads on its own: `AutoConfig`, `AutoModel`
(`trust_remote_code=True`: the model's code is in the folder) and `AutoTokenizer`, offline, in a
process where grr cannot be imported, giving the run's embeddings and captions exactly; the code
it carries is grr's own model code with its imports made relative (grr_train.infer.export_code)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_run import make_set, photos, train_tiny_run  # noqa: E402

import grr_train.api as grr  # noqa: E402
from grr_train.infer.export import export_run  # noqa: E402
from grr_train.infer.export_code import bundled_sources  # noqa: E402

TEXTS = ["a red dog", "two cats on a mat", "a small car"]
# Where grr cannot be imported: every grr package is refused, whatever sys.path holds.
LOAD_WITHOUT_GRR = textwrap.dedent('''
    import importlib.abc, json, sys

    class NoGrr(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("grr_train", "grr_data", "cli"):
                raise ImportError(f"grr is not installed here ({name})")

    sys.meta_path.insert(0, NoGrr())
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder, images, texts = sys.argv[1], sys.argv[2:-1], json.loads(sys.argv[-1])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    plain = AutoTokenizer.from_pretrained(folder)  # no remote code asked for: transformers' T5 tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    pixels = model.preprocess(images)
    with torch.no_grad():
        image = model.get_image_features(pixels)
        text = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))
        both = model(pixel_values=pixels, **tokenizer(texts, padding=True, return_tensors="pt"))
    print("\\nRESULT", json.dumps({  # on a line of its own: transformers asks on stdout about remote code
        "config": type(config).__name__, "model": type(model).__name__, "training": model.training,
        "tokenizer": type(tokenizer).__name__, "same_ids": plain(texts)["input_ids"] == tokenizer(texts)["input_ids"],
        "image": image.tolist(), "text": text.tolist(), "logits": both.logits_per_image.tolist(),
        "greedy": tokenizer.batch_decode(model.generate_captions(pixels), skip_special_tokens=True),
        "beams": tokenizer.batch_decode(model.generate_captions(pixels, num_beams=2), skip_special_tokens=True),
        "grr_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("grr_train", "grr_data")),
    }))
''')


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(a tiny run, its export, photos)."""
    root = tmp_path_factory.mktemp("hf")
    data, _ = make_set(root)
    run = train_tiny_run(data, root / "run")
    return run, export_run(run, root / "export"), photos(root / "photos", 3)


@pytest.mark.slow  # a second Python process imports torch and transformers
def test_transformers_loads_the_export_without_grr(made, tmp_path):
    run, exported, images = made
    (tmp_path / "load.py").write_text(LOAD_WITHOUT_GRR)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(exported), *map(str, images),
                             json.dumps(TEXTS)], capture_output=True, text=True, cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    got = json.loads(line.removeprefix("RESULT "))
    assert (got["config"], got["model"], got["training"]) == ("GrrCocaConfig", "GrrCocaModel", False)
    assert got["tokenizer"] == "T5Tokenizer" and got["same_ids"] and got["grr_modules"] == []
    model = grr.load(run)  # the run itself, through grr
    assert torch.equal(torch.tensor(got["image"]), model.embed_images(images))
    assert torch.equal(torch.tensor(got["text"]), model.embed_texts(TEXTS))
    want_logits = model.embed_images(images) @ model.embed_texts(TEXTS).T / 0.07
    assert torch.allclose(torch.tensor(got["logits"]), want_logits, rtol=1e-5, atol=1e-5)
    assert got["greedy"] == model.caption(images) and got["beams"] == model.caption(images, beams=2)


def test_the_bundled_code_imports_nothing_of_grr():
    import ast

    sources = bundled_sources()
    assert "modeling_grr_coca.py" in sources and "grr_model_coca.py" in sources
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(m.split(".")[0] in ("grr_train", "grr_data") for m in modules), (name, modules)
    assert "from .grr_model_coca import CoCa" in sources["modeling_grr_coca.py"]


def test_a_grr_import_that_cannot_be_bundled_is_refused_when_exporting(tmp_path, monkeypatch):
    (tmp_path / "probe_entry.py").write_text("def f():\n    from grr_data.format.layout import SEQ_LEN\n    return SEQ_LEN\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="probe_entry line 2: a grr import inside a function"):
        bundled_sources("probe_entry")


def test_the_transformers_class_is_the_run_model(made):
    """In-process (grr's own hf_model, no remote code): same weights and outputs, the tokenizer's
    ids laid out as grr lays them out, `preprocess` exactly the loaders' tensors."""
    from PIL import Image
    from transformers import AutoTokenizer

    from grr_data.loader import preprocess_image
    from grr_train.infer.hf_model import GrrCocaModel

    run, exported, images = made
    model = GrrCocaModel.from_pretrained(exported)
    reference = grr.load(run)
    assert model.state_dict().keys() == reference.model.state_dict().keys()
    pixels = model.preprocess([Image.open(p) for p in images])
    assert torch.equal(pixels, torch.stack([preprocess_image(p) for p in images]))
    assert torch.equal(model.preprocess(images[0].read_bytes()), pixels[:1])
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    long = " ".join(["red dog"] * 40)  # more words than a layout holds: cut as grr cuts
    texts = [*TEXTS, long, ""]
    ids = model.layout_ids(**tokenizer(texts, padding=True, return_tensors="pt"))
    assert torch.equal(ids, torch.from_numpy(reference.tokenizer.encode_batch(texts)[0]))
    with torch.no_grad():
        for how in ({"padding": True, "truncation": True}, {"padding": "max_length", "truncation": True,
                                                            "max_length": 70}):
            assert torch.equal(model.get_text_features(**tokenizer(texts, return_tensors="pt", **how)),
                               reference.embed_texts(texts)), how
