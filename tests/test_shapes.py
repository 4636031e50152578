"""The synthetic `shapes` set: deterministic from its seed, held-out combinations kept out of train
and val, captions that say what the image shows, words the sample tokenizer knows, and the same
fetch-output contract as every source (through `grr data shard`)."""

import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import typer
from fetch_helpers import read_split
from PIL import Image
from typer.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"

from grr_cli.fetch import fetch_command  # noqa: E402, F401  (registers `fetch` into data_app)
from grr_cli.groups import data_app  # noqa: E402
from grr_data.fetch import FetchError, FetchOptions, fetch  # noqa: E402
from grr_data.fetch.catalog import load_manifest  # noqa: E402
from grr_data.fetch.shapes import ShapesSpec, make_scene, render  # noqa: E402
from grr_data.format.records import iter_tar_samples  # noqa: E402
from grr_data.shard.run import shard_dataset  # noqa: E402
from grr_data.tokenizer import load_tokenizer  # noqa: E402

NUM_SCENES = 3000  # scenes without pixels: ~0.1 ms each


@pytest.fixture(scope="module")
def spec():
    return ShapesSpec(load_manifest("shapes"))


@pytest.fixture(scope="module")
def scenes(spec):
    return [make_scene(spec, 7, i) for i in range(NUM_SCENES)]


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    out = tmp_path_factory.mktemp("shapes") / "out"
    result = CliRunner().invoke(app, ["data", "fetch", "shapes", "--num-pairs", "60", "--seed", "3",
                                      "--out", str(out), "--shard-size", "20"])
    assert result.exit_code == 0, result.output
    return out, result.output


def _samples(folder):
    """{image_id: (jpg bytes, caption)} of an img2dataset-format folder."""
    found = {}
    for tar in sorted(folder.glob("*.tar")):
        for _, members in iter_tar_samples(tar):
            meta = json.loads(members["json"])
            found[meta["image_id"]] = (members["jpg"], members["txt"].decode())
    return found


def test_same_seed_same_pairs_and_a_larger_set_extends_a_smaller(spec, fetched, tmp_path):
    out = fetched[0]
    fetch("shapes", FetchOptions(out=tmp_path / "again", num_pairs=60, seed=3, shard_size=20))
    fetch("shapes", FetchOptions(out=tmp_path / "fewer", num_pairs=25, seed=3, shard_size=7))
    for split in ("train", "val", "test"):
        first = _samples(out / split)
        assert first == _samples(tmp_path / "again" / split), split  # same pixels, same captions
        fewer = _samples(tmp_path / "fewer" / split)
        assert fewer.items() <= first.items(), split
    # pixels are a function of (seed, index) alone
    scene = make_scene(spec, 3, 11)
    assert np.array_equal(np.asarray(render(spec, scene, 3)), np.asarray(render(spec, make_scene(spec, 3, 11), 3)))
    other = [make_scene(spec, 4, i).caption for i in range(50)]
    assert other != [make_scene(spec, 3, i).caption for i in range(50)]


def test_held_out_combinations_never_reach_train_or_val(spec, scenes):
    by_split = Counter(s.split for s in scenes)
    assert by_split["val"] / NUM_SCENES == pytest.approx(0.1, abs=0.02)
    assert by_split["test"] / NUM_SCENES == pytest.approx(0.1, abs=0.02)
    shown = {split: set() for split in ("train", "val", "test")}
    for scene in scenes:
        pairs = {(t.colour, t.shape) for t in scene.things}
        shown[scene.split] |= pairs
        if scene.split == "test":
            assert pairs & spec.held_out and scene.unseen, scene
        else:
            assert not pairs & spec.held_out and not scene.unseen, scene
    assert spec.held_out <= shown["test"]
    # the held-out ones are new combinations of known words: every colour and shape is trained on
    assert {c for c, _ in shown["train"]} == set(spec.colours) and {s for _, s in shown["train"]} == set(spec.shapes)
    # val shows seen combinations in new arrangements: most of its captions are not in train
    train_captions = {s.caption for s in scenes if s.split == "train"}
    val = [s for s in scenes if s.split == "val"]
    assert sum(s.caption not in train_captions for s in val) > len(val) / 4


def _boxes_apart(a, b, axis):
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    if axis == "horizontal":
        return ax1 < bx0 and abs((ay0 + ay1) - (by0 + by1)) / 2 < 0.05
    return ay1 < by0 and abs((ax0 + ax1) - (bx0 + bx1)) / 2 < 0.05


def test_captions_say_what_the_image_shows(spec, scenes):
    kinds = Counter()
    for scene in scenes:
        kinds[scene.kind] += 1
        words = scene.caption.split()
        for t in scene.things:
            assert all(0 <= v <= 1 for v in t.box) and t.colour in words and t.size in words
            low, high = spec.sizes[t.size]
            assert low - 1e-9 <= t.box[2] - t.box[0] <= high + 1e-9
        if scene.kind == "two":
            a, b = scene.things
            assert _boxes_apart(a, b, scene.axis), scene
            relation = spec.relations[scene.axis]
            assert scene.caption == f"a {a.size} {a.colour} {a.shape} {relation} a {b.size} {b.colour} {b.shape}"
        elif scene.kind == "count":
            assert len(scene.things) == spec.counts[scene.count_word] == len({t.box for t in scene.things})
            assert words[0] == scene.count_word and words[-1] == spec.plurals[scene.things[0].shape]
            for i, a in enumerate(scene.things):  # never overlapping
                for b in scene.things[i + 1:]:
                    assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        else:
            assert len(scene.things) == 1
    assert min(kinds.values()) > NUM_SCENES / 6


def test_the_named_colour_is_where_the_shape_is(spec):
    scene = next(s for i in range(200) if (s := make_scene(spec, 0, i)).kind == "one" and s.things[0].size == "large")
    pixels = np.asarray(render(spec, scene, 0)).astype(int)
    x0, y0, x1, y1 = (round(v * spec.side) for v in scene.things[0].box)
    centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
    assert np.abs(centre - np.array(spec.colours[scene.things[0].colour])).max() <= 20


def test_every_caption_word_is_known_to_the_sample_tokenizer(spec, scenes):
    tok = load_tokenizer(None)
    hf = tok._tok
    for word in sorted(spec.words()):
        ids = hf(word, add_special_tokens=False)["input_ids"]
        assert hf.unk_token_id not in ids, f"{word!r} has an unknown piece"
    captions = sorted({s.caption for s in scenes})
    ids, truncated, invalid = tok.encode_captions(captions)
    assert not truncated.any() and not invalid.any()
    assert [tok.decode(row) for row in ids] == captions


def test_fetch_output_contract(fetched):
    out, output = fetched
    manifest = json.loads((out / "fetch_manifest.json").read_text())
    splits = manifest["splits"]
    assert sum(s["num_samples"] for s in splits.values()) == 60 and set(splits) == {"train", "val", "test"}
    assert manifest["shapes"]["seed"] == 3 and manifest["shapes"]["num_pairs"] == 60
    # its word-level tokenizer beside the pairs (tests/test_demo_parts.py checks what it does)
    assert manifest["shapes"]["tokenizer"] == "tokenizer" and (out / "tokenizer" / "spiece.model").is_file()
    assert f"train: {splits['train']['num_samples']} done, 0 failed" in output
    for split in ("train", "val", "test"):
        samples = read_split(out / split)
        assert len(samples) == splits[split]["num_samples"]
        for meta in samples:
            assert meta["size"] == (288, 288) and meta["status"] == "success" and meta["source_split"] == split
            assert meta["combination"] == ("unseen" if split == "test" else "seen")
            assert json.loads(meta["scene"])["objects"]
        for tar in sorted((out / split).glob("*.tar")):
            assert (out / split / f"{tar.stem}.parquet").exists() and (out / split / f"{tar.stem}_stats.json").exists()
            for _, members in iter_tar_samples(tar):
                with Image.open(io.BytesIO(members["jpg"])) as img:
                    assert img.format == "JPEG" and img.mode == "RGB"
    assert len(list((out / "train").glob("*.tar"))) == -(-splits["train"]["num_samples"] // 20)


def test_shards_like_any_source(fetched, tmp_path):
    out = fetched[0]
    manifest, _ = shard_dataset(out, tmp_path / "shards", shard_size=50, workers=1, progress=False)
    fetched_counts = json.loads((out / "fetch_manifest.json").read_text())["splits"]
    assert {s: v["num_samples"] for s, v in manifest["splits"].items()} == {
        s: v["num_samples"] for s, v in fetched_counts.items()}


def test_bad_options_are_one_line_errors(fetched, tmp_path):
    out = fetched[0]
    with pytest.raises(FetchError, match="--num-pairs 0: give at least 1"):
        fetch("shapes", FetchOptions(out=tmp_path / "none", num_pairs=0))
    with pytest.raises(FetchError, match=r"made with --num-pairs 60 --seed 3; delete the folder"):
        fetch("shapes", FetchOptions(out=out, num_pairs=60, seed=4))
    with pytest.raises(FetchError, match="--num-pairs and --seed are for the generated `shapes` set, not cc12m"):
        fetch("cc12m", FetchOptions(out=tmp_path / "cc", num_pairs=10))
    again = fetch("shapes", FetchOptions(out=out, num_pairs=60, seed=3))
    assert any("already complete" in w for w in again["warnings"])
    # a folder holding another dataset's finished fetch is not "already complete" for this one
    with pytest.raises(FetchError, match=r"holds a finished shapes fetch, not sample; choose another --out"):
        fetch("sample", FetchOptions(out=out))


@pytest.mark.slow  # a whole img2dataset fetch of the sample set (its spawned processes: ~10 s)
def test_a_finished_sample_fetch_is_not_taken_for_shapes(tmp_path):
    sample = tmp_path / "sample"
    fetch("sample", FetchOptions(out=sample))
    with pytest.raises(FetchError, match=r"holds a finished sample fetch, not shapes"):
        fetch("shapes", FetchOptions(out=sample))
    assert not (sample / "_work" / "shapes.json").exists()  # refused before writing anything
