"""`grr data shard`: fetch-like input -> split, tokenized shards and manifest.json.

The helpers here make small img2dataset-format inputs; test_check.py and test_shard_resume.py
reuse them.
"""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from grr_data.check import check_dataset  # noqa: E402
from grr_data.format.layout import check_layout  # noqa: E402
from grr_data.format.records import decode_ids, iter_tar_samples, read_checksums, read_index  # noqa: E402
from grr_data.shard.run import shard_dataset  # noqa: E402
from grr_data.shard.samples import InputError  # noqa: E402
from grr_data.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer  # noqa: E402

WORDS = "red blue dog cat man woman tree car beach street sitting near a the on old small".split()


def jpeg(seed: int, size=(384, 288), fmt="JPEG") -> bytes:
    """A smooth, distinct picture (compresses small, decodes like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = rng.uniform(0, 255, 3)
    freq = rng.uniform(0.005, 0.05, 2)
    pixels = (base + 60 * np.sin(x[..., None] * freq[0] + y[..., None] * freq[1] + np.arange(3))) % 256
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def caption(seed: int) -> str:
    rng = np.random.default_rng(seed + 1000)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))


def write_tar(path: Path, samples: list[dict]) -> None:
    """samples: {"key", optional "jpg"/"png" bytes, optional "txt" (str or bytes), optional "json"}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext in ("jpg", "png", "txt", "json"):
                if ext not in s:
                    continue
                data = s[ext]
                data = json.dumps(data).encode() if ext == "json" else data
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.with_name(path.stem + "_stats.json").write_text(json.dumps({"successes": len(samples)}))


def make_fetch_output(root: Path, num_tars=3, per_tar=12, captions_per_image=2, split_folder=None) -> list[dict]:
    """img2dataset-like tars; each image has `captions_per_image` captions sharing its image_id."""
    folder = root / split_folder if split_folder else root
    written = []
    for t in range(num_tars):
        samples = []
        for i in range(per_tar):
            n = t * per_tar + i
            image = n // captions_per_image
            sample = {"key": f"{t:05d}{i:04d}", "jpg": jpeg(image), "txt": caption(n),
                      "json": {"key": f"{t:05d}{i:04d}", "image_id": f"img{image}", "status": "success",
                               "url": f"http://example.org/{image}.jpg"}}
            samples.append(sample)
        write_tar(folder / f"{t:05d}.tar", samples)
        written += samples
    (root / "fetch_manifest.json").write_text(json.dumps({"dataset": "made-up", "counts": len(written)}))
    return written


def read_set(out: Path) -> dict[str, dict[str, dict]]:
    """{split: {key: {ext: bytes}}} of a sharded set, via its manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {name: {k: m for entry in info["shards"] for k, m in iter_tar_samples(out / entry["path"])}
            for name, info in manifest["splits"].items()}


def shard_hashes(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {e["path"]: e["sha256"] for info in manifest["splits"].values() for e in info["shards"]}


@pytest.fixture(scope="module")
def flat_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch")
    return root, make_fetch_output(root)


@pytest.fixture(scope="module")
def sharded(flat_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("set") / "out"
    manifest, _ = shard_dataset(flat_input[0], out, split="70/30", shard_size=5, workers=1, progress=False)
    return out, manifest


def test_manifest_follows_the_contract(sharded, flat_input):
    out, manifest = sharded
    tok = load_tokenizer(None)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["layout_version"] == 1 and manifest["seq_len"] == 65
    import transformers

    spiece = hashlib.sha256((SAMPLE_TOKENIZER_DIR / "spiece.model").read_bytes()).hexdigest()
    assert manifest["tokenizer"] == {"name": "grr-sample-tokenizer", "vocab_size": tok.vocab_size, "pad": 0,
                                     "eos": 1, "bos": tok.special.bos, "cls": tok.special.cls,
                                     "files_sha256": {"spiece.model": spiece}, "library": "transformers",
                                     "library_version": transformers.__version__}
    assert manifest["sample_checksums"] == "crc32" and manifest["damaged_tars"] == 0
    assert set(manifest["splits"]) == {"train", "val"}
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == len(flat_input[1])
    assert manifest["skipped"] == {} and manifest["truncated_captions"] == 0
    assert manifest["duplicate_images"] == 0  # two captions of one image_id are not duplicates
    assert manifest["fetch_manifest"] == {"dataset": "made-up", "counts": 36}
    assert manifest["split_rule"].startswith("70/30 by image hash")
    for info in manifest["splits"].values():
        assert info["num_samples"] == sum(e["num_samples"] for e in info["shards"])
        assert all(e["num_samples"] == 5 for e in info["shards"][:-1])
        for entry in info["shards"]:
            assert (out / entry["path"]).with_suffix(".idx").is_file()
            assert len(read_checksums((out / entry["path"]).with_suffix(".crc"))) == entry["num_samples"]
            assert len(read_index((out / entry["path"]).with_suffix(".idx"))) == entry["num_samples"]
    assert not (out / ".work").exists()
    assert check_dataset(out, progress=False).ok


def test_every_record_has_a_valid_layout_and_its_caption(sharded, flat_input):
    out, _ = sharded
    tok = load_tokenizer(None)
    by_key = {s["key"]: s for s in flat_input[1]}
    splits = read_set(out)
    for name, samples in splits.items():
        for key, members in samples.items():
            assert sorted(members) == ["ids", "jpg", "json", "txt"]
            ids = decode_ids(members["ids"])
            assert check_layout(ids.tolist(), tok.special) is None
            source = by_key[key.split("_", 1)[1]]
            assert members["txt"].decode() == source["txt"] == tok.decode(ids)
            assert members["jpg"] == source["jpg"]  # already 288 on the short side: not re-encoded
            meta = json.loads(members["json"])
            assert meta["split"] == name and meta["source"] == "made-up"
            assert meta["image_id"] == source["json"]["image_id"]
            assert meta["original_size"] == [384, 288]


def test_all_captions_of_an_image_share_a_split_and_splits_are_disjoint(sharded):
    out, _ = sharded
    owner = {}
    for name, samples in read_set(out).items():
        for members in samples.values():
            image_id = json.loads(members["json"])["image_id"]
            assert owner.setdefault(image_id, name) == name
    assert set(owner.values()) == {"train", "val"}


def test_split_is_stable_across_reruns_and_worker_counts(sharded, flat_input, tmp_path):
    out, _ = sharded
    again, _ = shard_dataset(flat_input[0], tmp_path / "w2", split="70/30", shard_size=5, workers=2, progress=False)
    assert shard_hashes(tmp_path / "w2") == shard_hashes(out)
    assert again["splits"] == json.loads((out / "manifest.json").read_text())["splits"]


def test_duplicate_images_stay_in_one_split(tmp_path):
    # the same picture under 30 keys and 30 different image ids: one split, counted as duplicates
    write_tar(tmp_path / "in" / "00000.tar", [
        {"key": f"{i:04d}", "jpg": jpeg(7), "txt": caption(i), "json": {"image_id": f"id{i}"}} for i in range(30)
    ] + [{"key": f"{i:04d}", "jpg": jpeg(i), "txt": caption(i)} for i in range(30, 60)])
    manifest, _ = shard_dataset(tmp_path / "in", tmp_path / "out", shard_size=100, workers=1, progress=False)
    assert manifest["duplicate_images"] == 29
    splits = read_set(tmp_path / "out")
    homes = {name for name, samples in splits.items() for k in samples if int(k.split("_")[-1]) < 30}
    assert len(homes) == 1
    assert sum(len(s) for s in splits.values()) == 60
    assert check_dataset(tmp_path / "out", progress=False).ok


def test_source_splits_from_folders_drop_cross_split_copies(tmp_path, caplog):
    caplog.set_level("INFO")
    make_fetch_output(tmp_path / "in", num_tars=1, per_tar=6, split_folder="train")
    # val holds new pictures plus one (image 0) that is also in train
    write_tar(tmp_path / "in" / "validation" / "00000.tar", [
        {"key": f"{i:04d}", "jpg": jpeg(100 + i), "txt": caption(i)} for i in range(3)
    ] + [{"key": "0003", "jpg": jpeg(0), "txt": "the train picture again"}])
    manifest, _ = shard_dataset(tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    assert manifest["split_rule"] == "source splits"
    counts = {name: info["num_samples"] for name, info in manifest["splits"].items()}
    # image 0 has two captions in train; both are dropped, val keeps its copy
    assert counts == {"train": 4, "val": 4}  # no test split in the source, none in the set
    assert manifest["skipped"] == {"duplicate_across_splits": 2}
    assert "in the order test, val, train" in caplog.text  # why the progress shows val before train
    assert check_dataset(tmp_path / "out", progress=False).ok


def test_planted_bad_samples_are_counted_per_reason(tmp_path, caplog):
    good = jpeg(1)
    bad = [
        {"key": "corrupt", "jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": "a red dog"},
        {"key": "truncjpg", "jpg": jpeg(2)[:3000], "txt": "a red dog"},
        {"key": "empty", "jpg": jpeg(3), "txt": "  \n"},
        {"key": "long", "jpg": jpeg(4), "txt": " ".join(["dog"] * 100)},
        {"key": "badutf8", "jpg": jpeg(5), "txt": b"a red \xff\xfe dog"},
        {"key": "nocaption", "jpg": jpeg(6)},
        {"key": "noimage", "txt": "a red dog"},
        {"key": "good", "jpg": good, "txt": "a red dog"},
        {"key": "bigpng", "png": jpeg(8, size=(600, 400), fmt="PNG"), "txt": "an old car"},
        {"key": "html", "jpg": jpeg(9), "txt": "a <s>red</s> dog"},  # `</s>` is T5's EOS piece
        {"key": "tags", "jpg": jpeg(10), "txt": "a <cls> dog <bos>"},  # added tokens: ordinary text
    ]
    write_tar(tmp_path / "in" / "00000.tar", bad)
    # a second tar cut inside its third sample's image: two samples survive, the rest is lost
    write_tar(tmp_path / "in" / "00001.tar", [{"key": f"{i:04d}", "jpg": jpeg(20 + i), "txt": caption(i)}
                                              for i in range(5)])
    data = (tmp_path / "in" / "00001.tar").read_bytes()
    third = data.index(b"0002.jpg")
    (tmp_path / "in" / "00001.tar").write_bytes(data[: third + 512 + 2000])
    manifest, _ = shard_dataset(tmp_path / "in", tmp_path / "out", shard_size=100, workers=1, progress=False)
    assert manifest["skipped"] == {
        "corrupt_image": 1, "truncated_image": 1, "empty_caption": 1, "invalid_utf8_caption": 1,
        "missing_caption": 1, "missing_image": 1, "lost_in_damaged_tar": 3,
        "special_token_in_caption": 1,
    }
    assert manifest["damaged_tars"] == 1
    assert manifest["truncated_captions"] == 1
    assert manifest["resized_images"] == 1
    kept = {k: m for s in read_set(tmp_path / "out").values() for k, m in s.items()}
    assert sorted(kept) == ["00000_bigpng", "00000_good", "00000_long", "00000_tags", "00001_0000", "00001_0001"]
    assert load_tokenizer(None).decode(decode_ids(kept["00000_tags"]["ids"])) == "a <cls> dog <bos>"
    resized = Image.open(io.BytesIO(kept["00000_bigpng"]["jpg"]))
    assert resized.format == "JPEG" and resized.size == (432, 288)
    assert json.loads(kept["00000_bigpng"]["json"])["original_size"] == [600, 400]
    assert json.loads(kept["00000_long"]["json"])["caption_truncated"] is True
    assert "00000.tar:truncjpg" in caplog.text and "00001.tar" in caplog.text
    assert check_dataset(tmp_path / "out", progress=False).ok


def test_refuses_a_complete_or_foreign_output(sharded, flat_input, tmp_path):
    with pytest.raises(FileExistsError, match="complete sharded set"):
        shard_dataset(flat_input[0], sharded[0], split="70/30", workers=1, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        shard_dataset(flat_input[0], tmp_path / "other", workers=1, progress=False)
    with pytest.raises(ValueError, match="percentages summing to 100"):
        shard_dataset(flat_input[0], tmp_path / "x", split="95/6", workers=1, progress=False)


def test_cut_and_short_tars_are_counted_and_unfinished_fetches_refused(tmp_path):
    def five(t):
        return [{"key": f"{i:04d}", "jpg": jpeg(10 * t + i), "txt": caption(i)} for i in range(5)]

    for t in range(3):
        write_tar(tmp_path / "in" / f"{t:05d}.tar", five(t))
    # 00000.tar cut exactly where its third sample begins: tarfile alone reads two whole samples;
    # the second may have lost members to the cut (no way to tell), so only the first is kept
    cut = tmp_path / "in" / "00000.tar"
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"0002.jpg")])
    # 00001.tar is whole but its stats file says img2dataset wrote 7 samples into it
    (tmp_path / "in" / "00001_stats.json").write_text(json.dumps({"successes": 7}))
    manifest, _ = shard_dataset(tmp_path / "in", tmp_path / "out", shard_size=100, workers=1, progress=False)
    # samples by reason; the damaged tar is counted apart, as a tar
    assert manifest["skipped"] == {"lost_in_damaged_tar": 4, "lost_in_short_tar": 2}
    assert manifest["damaged_tars"] == 1
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == 1 + 5 + 5

    # a killed fetch leaves a tar without its stats file: refused, naming it
    (tmp_path / "in" / "00002_stats.json").unlink()
    with pytest.raises(InputError, match=r"00002\.tar.*rerun `grr data fetch`"):
        shard_dataset(tmp_path / "in", tmp_path / "out2", workers=1, progress=False)


def test_a_rotated_phone_jpeg_is_stored_upright():
    from grr_data.fetch.convert import resize_to_jpeg
    from grr_data.shard.samples import prepare_image

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": the pixels are stored sideways
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg(3, size=(384, 288)))).save(out, format="JPEG", quality=95, exif=exif)
    stored, size, resized = prepare_image(out.getvalue())
    assert resized and size == (288, 384) and Image.open(io.BytesIO(stored)).size == (288, 384)
    # the fetch converters store the same bytes: one resize rule
    assert resize_to_jpeg(out.getvalue())[0] == stored
