"""`grr caption`, `grr embed` and `grr classify` do from the shell what grr_train.api does: on a
run, a checkpoint or an export folder, on image files or folders, printed as text or JSON or
written to .npy / .npz / .jsonl; bad input is one `error:` line."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_run import make_set, photos, train_tiny_run  # noqa: E402

import grr_train.api as grr  # noqa: E402
from grr_cli.main import app  # noqa: E402
from grr_train.infer.export import export_run  # noqa: E402

TEXTS = ["a red dog", "two cats"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(a tiny run, its export, a folder of three photos, the run loaded through the API)."""
    root = tmp_path_factory.mktemp("infer")
    data, _ = make_set(root)
    run = train_tiny_run(data, root / "run")
    photos(root / "photos", 3)
    return run, export_run(run, root / "export"), root / "photos", grr.load(run)


def grr_cli(*args):
    result = CliRunner().invoke(app, [*map(str, args), "--device", "cpu"])
    return result


def test_caption_a_folder_with_a_run_or_an_export(made):
    run, exported, folder, model = made
    files = sorted(folder.glob("*.jpg"))
    by_run = grr_cli("caption", folder, "--ckpt", run, "--beams", "2")
    assert by_run.exit_code == 0, by_run.output
    assert by_run.stdout.splitlines() == [f"{f}: {c}" for f, c in zip(files, model.caption(files, beams=2),
                                                                      strict=True)]
    by_export = grr_cli("caption", folder, "--ckpt", exported, "--beams", "2")
    assert by_export.exit_code == 0 and by_export.stdout == by_run.stdout, by_export.output
    as_json = grr_cli("caption", files[1], folder, "--ckpt", exported, "--json")
    assert json.loads(as_json.stdout) == [{"image": str(f), "caption": c} for f, c in
                                          zip([files[1], *files], model.caption([files[1], *files]), strict=True)]


def test_embed_writes_npy_npz_and_jsonl(made, tmp_path):
    run, _, folder, model = made
    files = sorted(folder.glob("*.jpg"))
    images, texts = model.embed_images(files), model.embed_texts(TEXTS)
    result = grr_cli("embed", folder, "--ckpt", run, "--out", tmp_path / "images.npy")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(f"3 image and 0 text embeddings (64 numbers each) to {tmp_path / 'images.npy'}")
    assert np.array_equal(np.load(tmp_path / "images.npy"), images.numpy())
    (tmp_path / "texts.txt").write_text("a red dog\n\ntwo cats\n")
    result = grr_cli("embed", folder, "--ckpt", run, "--texts-file", tmp_path / "texts.txt", "--out",
                     tmp_path / "both.npz")
    assert result.exit_code == 0, result.output
    both = np.load(tmp_path / "both.npz")
    assert np.array_equal(both["image_embeddings"], images.numpy()) and list(both["images"]) == list(map(str, files))
    assert np.array_equal(both["text_embeddings"], texts.numpy()) and list(both["texts"]) == TEXTS
    result = grr_cli("embed", files[0], "--ckpt", run, "--text", TEXTS[0], "--out", tmp_path / "rows.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["input"]) for r in rows] == [("image", str(files[0])), ("text", TEXTS[0])]
    assert torch.equal(torch.tensor(rows[1]["embedding"]), model.embed_texts(TEXTS[:1])[0])  # a batch of one


def test_embed_prints_text_or_json(made):
    run, _, _, model = made
    printed = grr_cli("embed", "--ckpt", run, "--text", TEXTS[0], "--text", TEXTS[1])
    lines = printed.stdout.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["text", TEXTS[0]], ["text", TEXTS[1]]]
    numbers = torch.tensor([[float(v) for v in line.split("\t")[2].split()] for line in lines])
    assert torch.allclose(numbers, model.embed_texts(TEXTS), atol=1e-6)  # printed with 6 significant digits
    as_json = grr_cli("embed", "--ckpt", run, "--text", TEXTS[1], "--json")
    assert torch.equal(torch.tensor(json.loads(as_json.stdout)["embedding"]), model.embed_texts(TEXTS[1:])[0])


def test_classify_prints_each_images_label(made):
    _, exported, folder, model = made
    files = sorted(folder.glob("*.jpg"))
    want = model.classify(files, ["dog", "cat", "car"], template="a drawing of a {}")
    result = grr_cli("classify", folder, "--ckpt", exported, "--label", "dog", "--label", "cat", "--label", "car",
                     "--template", "a drawing of a {}")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{p.image}: {p.label} ({p.score:.3f})" for p in want]
    as_json = grr_cli("classify", folder, "--ckpt", exported, "--label", "dog", "--label", "cat", "--label", "car",
                      "--template", "a drawing of a {}", "--json")
    got = json.loads(as_json.stdout)
    assert [g["label"] for g in got] == [p.label for p in want]
    assert np.allclose([list(g["probs"].values()) for g in got], [list(p.probs.values()) for p in want], atol=1e-6)


@pytest.mark.parametrize(("args", "message"), [
    (["embed", "--ckpt", "RUN"], "error: nothing to embed: give image files or folders, --text or --texts-file"),
    (["embed", "PHOTOS", "--text", "a dog", "--ckpt", "RUN", "--out", "x.npy"],
     "error: --out x.npy: a .npy file holds one kind; with images and texts write .npz or .jsonl"),
    (["embed", "--text", "a dog", "--ckpt", "RUN", "--out", "x.csv"], "error: --out x.csv: write .npy, .npz or .jsonl"),
    (["classify", "PHOTOS", "--ckpt", "RUN", "--label", "dog"],
     "error: classify needs a list of at least two class names, got ['dog']"),
    (["classify", "PHOTOS", "--ckpt", "RUN", "--label", "a", "--label", "b", "--template", "a photo"],
     "error: --template 'a photo' has no {} for the class name"),
    (["caption", "PHOTOS/nope.jpg", "--ckpt", "RUN"], "error: PHOTOS/nope.jpg: no such image file"),
    (["caption", "PHOTOS", "--ckpt", "RUN/../rnu"], "error: RUN/../rnu: not found (no such run, checkpoint or export "
                                                    "folder); did you mean RUN/../run?"),
])
def test_bad_input_is_one_error_line(made, args, message):
    run, _, folder, _ = made
    swap = {"RUN": str(run), "PHOTOS": str(folder)}

    def fill(text):
        for key, value in swap.items():
            text = text.replace(key, value)
        return text

    result = grr_cli(*map(fill, args))
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [fill(message)], result.output
