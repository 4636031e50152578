"""The Python API (grr_train.api) and a run that travels with its tokenizer (grr_train.runs.tokenizer).

README's "Python API" examples are `README_EXAMPLES` below, run as they are in a folder holding
`runs/finetune-grr` (a tiny trained run), `photos/` and `exports/`; a test checks README's section
shows exactly these examples (and fails if the section goes).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import reference_losses as reference  # noqa: E402
from tiny_run import make_fetch_output, make_set, photos, tiny_config, train_tiny_run  # noqa: E402

import grr_train.api as grr  # noqa: E402
from grr_cli.main import app  # noqa: E402
from grr_data.format.manifest import Manifest  # noqa: E402
from grr_data.tokenizer import SAMPLE_TOKENIZER_DIR, SAMPLE_TOKENIZER_NAME  # noqa: E402
from grr_train.runs.tokenizer import copy_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

README_EXAMPLES = {
    "three lines": '''\
import grr_train.api as grr
model = grr.load("runs/finetune-grr")
print(model.caption(["photos/dog.jpg"]))
''',
    "embed, classify, caption": '''\
import grr_train.api as grr

model = grr.load("runs/finetune-grr", device="auto")  # a run, a checkpoint folder or a `grr export` folder

pixels = model.preprocess("photos/dog.jpg")  # (3, 288, 288) float32, exactly as the loaders give it

# L2-normalised embeddings, as the contrastive loss uses them; a folder means its images, sorted by name
images = model.embed_images("photos/")  # (3, D)
texts = model.embed_texts(["a dog on the grass", "a red car"])  # (2, D)
print(images @ texts.T)  # cosine similarities

# zero-shot classification: softmax over cosine similarity / temperature of "a photo of a {name}."
for p in model.classify("photos/", ["dog", "cat", "car"]):
    print(p.image, p.label, f"{p.score:.2f}")

# captions: greedy, beam search (all images of a batch searched together), sampling
print(model.caption("photos/"))
print(model.caption("photos/", beams=3))
print(model.caption("photos/", top_p=0.9, temperature=0.8, seed=0))
''',
    "exported": '''\
import grr_train.api as grr
from grr_train.infer.export import HubCoCa

model = grr.load("exports/finetune-grr")  # after `grr export runs/finetune-grr --out exports/finetune-grr`
print(model.caption(["photos/cat.jpg"], beams=2))

coca = HubCoCa.from_pretrained("exports/finetune-grr")  # the bare torch module, weights only
''',
    "open_clip shape": '''\
import torch
from PIL import Image

import grr_train.api as grr

# open_clip's (model, train transform, eval transform) and tokenizer, for a run or an export
model, _, preprocess = grr.create_model_and_transforms("runs/finetune-grr")
tokenizer = grr.get_tokenizer("runs/finetune-grr")

image = preprocess(Image.open("photos/dog.jpg"))[None]  # (1, 3, 288, 288)
text = tokenizer(["a dog", "a cat", "a car"])  # (3, 65) ids in grr's layout
with torch.no_grad():
    image_features, text_features = model.encode_image(image), model.encode_text(text)  # L2-normalised
print((model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1))
''',
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(the set, the tokenizer folder it was sharded with, a run trained on it)."""
    root = tmp_path_factory.mktemp("api")
    data, tokenizer = make_set(root)
    return data, tokenizer, train_tiny_run(data, root / "run")


@pytest.fixture(scope="module")
def model(made):
    return grr.load(made[2])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("photos"), 3)


# ---------------------------------------------------------------- README's examples


def cli_captions(run, images, *flags) -> list[str]:
    """The captions `grr caption` prints for `images`, one per line `PATH: caption`."""
    result = CliRunner().invoke(app, ["caption", *map(str, images), "--ckpt", str(run), "--device", "cpu", *flags])
    assert result.exit_code == 0, result.output
    return [line.split(": ", 1)[1] for line in result.stdout.splitlines()]


@torch.no_grad()
def zero_shot_by_hand(loaded, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities (N, C), softmax of them / 0.07) from the bare CoCa module's forward."""
    ids = torch.from_numpy(loaded.tokenizer.encode_batch(texts)[0])
    pixels = torch.stack([loaded.preprocess(p) for p in images])
    image_embed = loaded.model(pixels, ids[:1].expand(len(images), -1)).image_embed
    text_embed = loaded.model(pixels[:1].expand(len(texts), -1, -1, -1), ids).text_embed
    similarity = image_embed @ text_embed.T
    return similarity, (similarity / 0.07).softmax(dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("name", README_EXAMPLES)
def test_readme_example_prints_what_it_says(name, made, tmp_path, monkeypatch, capsys):
    import ast
    import re

    from grr_train.runs.weights import load_model

    (tmp_path / "runs").mkdir()
    run = tmp_path / "runs" / "finetune-grr"
    shutil.copytree(made[2], run)
    for path, stem in zip(photos(tmp_path / "photos", 3), ("dog", "cat", "car"), strict=True):
        path.rename(path.with_name(f"{stem}.jpg"))
    monkeypatch.chdir(tmp_path)
    if name == "exported":
        result = CliRunner().invoke(app, ["export", "runs/finetune-grr", "--out", "exports/finetune-grr"])
        assert result.exit_code == 0, result.output
    namespace = {}
    exec(compile(README_EXAMPLES[name], f"README example {name!r}", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    files = [Path("photos") / f"{s}.jpg" for s in ("car", "cat", "dog")]  # a folder's images: sorted by name
    if name == "three lines":
        assert printed == [repr(cli_captions(run, ["photos/dog.jpg"]))]
    elif name == "embed, classify, caption":
        loaded = grr.load(run)
        similarity, _ = zero_shot_by_hand(loaded, files, ["a dog on the grass", "a red car"])
        table = "\n".join(line for line in printed if not line.startswith(("photos/", "['")))
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", table)]
        assert table.startswith("tensor([[") and numbers == pytest.approx(similarity.flatten().tolist(), abs=1e-4)
        _, probs = zero_shot_by_hand(loaded, files, [f"a photo of a {n}." for n in ("dog", "cat", "car")])
        classified = [line.split() for line in printed if line.startswith("photos/")]
        assert [c[0] for c in classified] == [str(f) for f in files]
        for (_, label, score), row in zip(classified, probs, strict=True):
            assert label == ("dog", "cat", "car")[int(row.argmax())] and float(score) == pytest.approx(
                float(row.max()), abs=0.005 + 1e-9)
        captions = [ast.literal_eval(line) for line in printed if line.startswith("['")]
        assert captions == [cli_captions(run, files), cli_captions(run, files, "--beams", "3"),
                            cli_captions(run, files, "--top-p", "0.9", "--temperature", "0.8", "--seed", "0")]
    elif name == "open_clip shape":  # softmax over similarity / 0.07 (the paper's temperature), by hand
        _, probs = zero_shot_by_hand(grr.load(run), [Path("photos/dog.jpg")], ["a dog", "a cat", "a car"])
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", "\n".join(printed))]
        assert printed[0].startswith("tensor([[") and numbers == pytest.approx(probs.flatten().tolist(), abs=1e-4)
    else:
        assert name == "exported", f"no check written for README's example {name!r}"
        assert printed == [repr(cli_captions(run, ["photos/cat.jpg"], "--beams", "2"))]  # the export's = the run's
        original, _ = load_model(run)
        coca = namespace["coca"]
        assert coca.state_dict().keys() == original.state_dict().keys()
        assert all(torch.equal(coca.state_dict()[k], v) for k, v in original.state_dict().items())


def test_readme_shows_the_tested_examples():
    readme = (ROOT / "README.md").read_text()
    assert "## Python API" in readme, "README.md has lost its '## Python API' section, whose examples this file runs"
    for name, code in README_EXAMPLES.items():
        assert f"```python\n{code}```" in readme, f"README's example {name!r} differs from tests/test_api.py"


# ---------------------------------------------------------------- a run travels with its tokenizer


@pytest.mark.slow
def test_moved_run_without_its_original_tokenizer_captions_and_evaluates(made, images, tmp_path):
    data, tokenizer, run = made
    runner = CliRunner()
    before = runner.invoke(app, ["caption", *map(str, images), "--ckpt", str(run), "--device", "cpu"])
    assert before.exit_code == 0, before.stdout
    # Another machine: the run at another path, the tokenizer folder the set names gone.
    moved_data, moved_run = tmp_path / "data", tmp_path / "elsewhere" / "run"
    shutil.copytree(data, moved_data)
    shutil.copytree(run, moved_run)
    hidden = tmp_path / "hidden-tokenizer"
    tokenizer.rename(hidden)
    try:
        with pytest.raises(ValueError, match="my-tokenizer: not a directory"):  # what runs without a copy did
            grr.load(moved_run, tokenizer=tokenizer)
        after = runner.invoke(app, ["caption", *map(str, images), "--ckpt", str(moved_run), "--device", "cpu"])
        assert after.exit_code == 0, after.output
        assert after.stdout == before.stdout
        ckpt = runner.invoke(app, ["caption", *map(str, images), "--ckpt",
                                   str(moved_run / "checkpoints" / "step-0000001"), "--device", "cpu"])
        assert ckpt.stdout == before.stdout  # a checkpoint folder finds its parent run's copy
        ev = runner.invoke(app, ["eval", str(moved_run), "--data", str(moved_data), "--split", "train",
                                 "--contrastive-batch-size", "4", "--device", "cpu", "--json"])
        assert ev.exit_code == 0, ev.output
        result = json.loads(ev.stdout)
        assert result["captioning"]["num_images"] > 0 and result["captioning"]["examples"][0]["generated"] != ""
        assert grr.load(moved_run).caption(images) == [line.split(": ", 1)[1] for line in before.stdout.splitlines()]
    finally:
        hidden.rename(tokenizer)


def test_fine_tuning_elsewhere_needs_only_the_run_folder(made, tmp_path):
    """New data sharded with the run's copy (`--tokenizer RUN/tokenizer`) is the run's tokenizer."""
    from dataclasses import replace

    from grr_data.shard.run import shard_dataset
    from grr_train.train.trainer import run_training

    data, tokenizer, run = made
    moved_run = tmp_path / "run"
    shutil.copytree(run, moved_run)
    hidden = tmp_path / "hidden-tokenizer"
    tokenizer.rename(hidden)
    try:
        make_fetch_output(tmp_path / "in", num_tars=1, per_tar=4, split_folder="train")
        shard_dataset(tmp_path / "in", tmp_path / "data", tokenizer=str(moved_run / "tokenizer"), progress=False,
                      workers=1)
        cfg = replace(tiny_config(tmp_path / "data"), recipe="finetune", init_from=str(moved_run), dropout=0.0,
                      lambda_con=0.6, lambda_cap=1.4)
        assert run_training(cfg, tmp_path / "finetuned")["step"] == 1  # the tokenizer check passed
    finally:
        hidden.rename(tokenizer)
    # the step started from the moved run's weights: its loss is theirs on the step's batch, by hand
    from grr_data.loader import make_loader
    from grr_train.runs.metrics import read_metrics
    from grr_train.runs.weights import load_model

    (logged,) = read_metrics(tmp_path / "finetuned", "train")
    (batch,) = list(make_loader(tmp_path / "data", "train", batch_size=4, kind="cpu", shuffle=True, seed=cfg.seed,
                                num_workers=0))
    start, info = load_model(moved_run)
    with torch.no_grad():
        out = start(batch["images"], batch["ids"])
    ignored = info["special"].ignored_targets
    caption = reference.caption_sum(out.logits, batch["ids"][:, 1:], ignored) / reference.counted(
        batch["ids"][:, 1:], ignored).sum()
    expected = 0.6 * reference.contrastive(out.image_embed, out.text_embed, 0.07) + 1.4 * caption
    assert logged["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_a_damaged_copy_is_refused(made, images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made[2], run)
    spiece = run / "tokenizer" / "spiece.model"
    damaged = bytearray(spiece.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    spiece.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"tokenizer is not the tokenizer the model was trained with \(spiece.model "
                                         r"has SHA-256 [0-9a-f]{12}\.\.\., expected"):
        grr.load(run)
    result = CliRunner().invoke(app, ["caption", str(images[0]), "--ckpt", str(run), "--device", "cpu"])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
    assert result.stderr.startswith(f"error: {run / 'tokenizer'} is not the tokenizer the model was trained with")


def test_copy_tokenizer_records_and_checks_the_copy(made, tmp_path):
    data, tokenizer, _ = made
    record = Manifest.read(data).tokenizer.to_dict()
    stored = copy_tokenizer(tmp_path / "run", record)
    hashes = record["files_sha256"]
    assert stored == {**record, "run_copy": {"folder": "tokenizer", "files_sha256": hashes}}
    assert (tmp_path / "run" / "tokenizer" / "spiece.model").read_bytes() == (tokenizer / "spiece.model").read_bytes()
    assert copy_tokenizer(tmp_path / "run", record) == stored  # a resumed run keeps its copy
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tokenizer"]  # no temporaries left


def test_copy_tokenizer_refuses_files_that_differ_from_the_sets_fingerprint(made, tmp_path):
    record = Manifest.read(made[0]).tokenizer.to_dict()
    record["files_sha256"] = {"spiece.model": "0" * 64}
    with pytest.raises(ValueError, match=r"my-tokenizer'? \(.*\) is not the one the training set was sharded with: "
                                         r"spiece.model has SHA-256 .* expected 000000000000\.\.\.; restore"):
        copy_tokenizer(tmp_path / "run", record)
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_copy_tokenizer_copies_the_sample_tokenizer_and_warns_for_one_it_cannot_find(tmp_path, capsys):
    sample = {"name": SAMPLE_TOKENIZER_NAME, "vocab_size": 588}
    assert copy_tokenizer(tmp_path / "a", sample)["run_copy"]["files_sha256"]
    assert (tmp_path / "a" / "tokenizer" / "spiece.model").read_bytes() == \
        (SAMPLE_TOKENIZER_DIR / "spiece.model").read_bytes()
    gone = {"name": str(tmp_path / "gone"), "vocab_size": 588}
    assert copy_tokenizer(tmp_path / "b", gone) == gone
    assert "warning: the run's tokenizer" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_training_copies_the_tokenizer_into_the_run(made, tmp_path):
    from grr_train.train.trainer import run_training

    run_training(tiny_config(made[0]), tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer" / "spiece.model").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tokenizer"]["run_copy"]["folder"] == "tokenizer"


# ---------------------------------------------------------------- the API


def test_preprocess_is_what_the_loader_gives(made, model):
    from grr_data.format.records import iter_tar_samples
    from grr_data.loader import make_loader

    data = made[0]
    batch = next(iter(make_loader(data, "train", batch_size=8, kind="cpu", shuffle=False, num_workers=0,
                                  with_keys=True)))
    jpgs = {key: members["jpg"] for shard in sorted((data / "train").glob("*.tar"))
            for key, members in iter_tar_samples(shard)}
    for key, pixels in zip(batch["keys"], batch["images"], strict=True):
        assert torch.equal(model.preprocess(jpgs[key]), pixels), key


def test_embeddings_are_the_models_normalised_ones(model, images):
    image_embed = model.embed_images(images)
    texts = ["a dog", "a red car on a street", "two cats"]
    text_embed = model.embed_texts(texts)
    assert image_embed.shape == (3, 64) and text_embed.shape == (3, 64)
    assert torch.allclose(image_embed.norm(dim=-1), torch.ones(3)) and torch.allclose(text_embed.norm(dim=-1),
                                                                                      torch.ones(3))
    ids = torch.from_numpy(model.tokenizer.encode_batch(texts)[0])
    pixels = torch.stack([model.preprocess(p) for p in images])
    with torch.no_grad():
        out = model.model(pixels, ids)
    assert torch.allclose(image_embed, out.image_embed, atol=1e-6) and torch.allclose(text_embed, out.text_embed,
                                                                                      atol=1e-6)
    assert torch.equal(model.embed_images(images, batch_size=1), torch.cat([model.embed_images([p]) for p in images]))


def test_zero_shot_classification_of_a_folder(model, images):
    names = ["dog", "cat", "car"]
    predictions = model.classify(images[0].parent, names, template="a photo of a {}.")
    assert [p.image for p in predictions] == [str(p) for p in sorted(images)]
    _, want = zero_shot_by_hand(model, sorted(images), [f"a photo of a {n}." for n in names])
    for p, row in zip(predictions, want.tolist(), strict=True):
        assert list(p.probs) == names and np.allclose(list(p.probs.values()), row, atol=1e-6)
        assert p.label == names[int(np.argmax(row))] and p.score == max(p.probs.values())
        assert abs(sum(p.probs.values()) - 1) < 1e-5
    assert model.temperature == 0.07  # the preset's, the one the contrastive loss used


def test_classify_and_caption_name_bad_input(model, images, tmp_path):
    with pytest.raises(ValueError, match="at least two class names"):
        model.classify(images, ["dog"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no image files"):
        model.classify(tmp_path / "empty", ["dog", "cat"])
    with pytest.raises(FileNotFoundError, match="nope.jpg: no such image file"):
        model.caption([images[0], tmp_path / "nope.jpg"])
    with pytest.raises(ValueError, match="choose beam search or sampling"):
        model.caption(images, beams=2, top_k=5)


@pytest.mark.slow
def test_captions_greedy_beam_and_sampling(model, made, images):
    result = CliRunner().invoke(app, ["caption", *map(str, images), "--ckpt", str(made[2]), "--beams", "2",
                                      "--device", "cpu"])
    assert model.caption(images, beams=2) == [line.split(": ", 1)[1] for line in result.stdout.splitlines()]
    assert model.caption(images, beams=2, batch_size=1) == model.caption(images, beams=2)
    assert model.caption(images[0].parent) == model.caption(sorted(images))
    sampled = model.caption(images, top_k=20, temperature=1.5, seed=3)
    assert sampled == model.caption(images, top_k=20, temperature=1.5, seed=3)
    assert all(isinstance(c, str) for c in sampled)


def test_load_names_what_it_cannot_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder with checkpoints"):
        grr.load(tmp_path)
    with pytest.raises(ValueError, match="nobody/nothing: not a local folder, and it cannot be fetched from the hub"):
        grr.load("nobody/nothing")


@pytest.mark.slow
def test_an_exported_folder_loads_like_its_run(made, model, images, tmp_path):
    from grr_train.infer.export import export_run

    out = export_run(made[2], tmp_path / "exported")
    loaded = grr.load(out)
    assert loaded.caption(images, beams=2) == model.caption(images, beams=2)
    assert torch.equal(loaded.embed_images(images), model.embed_images(images))
    (out / "spiece.model").write_bytes(SAMPLE_TOKENIZER_DIR.joinpath("README.md").read_bytes())
    with pytest.raises(ValueError, match="is not the tokenizer the model was trained with"):
        grr.load(out)


def test_images_as_pil_images_and_tensors(model, images):
    from PIL import Image

    want = model.embed_images(images)
    pil = [Image.open(p) for p in images]
    pixels = torch.stack([model.preprocess(p) for p in images])  # (3, 3, 288, 288)
    assert torch.equal(model.embed_images(pil), want)
    assert torch.equal(model.embed_images(pixels), want) and torch.equal(model.embed_images(list(pixels)), want)
    # one image alone (a batch of one sums in another order than a batch of three)
    assert torch.equal(model.embed_images(pixels[0]), model.embed_images([images[0]]))
    assert torch.equal(model.embed_images(pil[1]), model.embed_images([images[1]]))
    assert model.caption(pil) == model.caption(images)
    mixed = model.classify([pil[0], pixels[1], images[2].read_bytes(), images[0]], ["dog", "cat"])
    assert [p.image for p in mixed] == ["<PIL 0>", "<tensor 1>", "<bytes 2>", str(images[0])]
    assert mixed[0].probs == pytest.approx(mixed[3].probs, abs=1e-6)


def test_other_image_kinds_are_refused_naming_the_accepted_ones(model, images):
    accepted = r"images must be image file paths, a folder, the files' bytes, PIL images, or tensors as "
    with pytest.raises(TypeError, match=accepted + r".*; got int$"):
        model.embed_images(42)
    with pytest.raises(TypeError, match=r"^image 1 is a dict; " + accepted):
        model.caption([images[0], {"path": "x.jpg"}])
    with pytest.raises(ValueError, match=r"an image tensor must be \(3, 288, 288\) floats as model.preprocess gives "
                                         r"them, got torch.uint8 \(3, 288, 288\); pass the PIL image or file"):
        model.embed_images(torch.zeros(3, 288, 288, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got torch.float32 \(3, 224, 224\)"):
        model.embed_images(torch.zeros(2, 3, 224, 224))


def test_a_mistyped_local_path_is_not_found_not_a_hub_error(made, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    shutil.copytree(made[2], tmp_path / "runs" / "finetune-grr")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^runs/finetune-gr: not found \(no such run, checkpoint or export "
                                                r"folder\); did you mean runs/finetune-grr\?$"):
        grr.load("runs/finetune-gr")
    with pytest.raises(FileNotFoundError, match=r"^runs/zzz: not found \(no such run, checkpoint or export folder\)$"):
        grr.get_tokenizer("runs/zzz")
    with pytest.raises(FileNotFoundError, match=r"elsewhere/run: not found"):
        grr.load(tmp_path / "elsewhere" / "run")
