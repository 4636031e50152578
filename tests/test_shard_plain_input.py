"""`grr data shard` on a user's own images (grr_data.shard.plain): a folder with captions beside
the images, or a CSV/JSONL list; the same pipeline, counts, determinism and resume as tar input."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"

from test_shard import caption, jpeg, read_set, shard_hashes  # noqa: E402

import grr_data.shard.plain  # noqa: E402
from grr_cli.main import app  # noqa: E402
from grr_data.check import check_dataset  # noqa: E402
from grr_data.format.records import decode_ids  # noqa: E402
from grr_data.loader import make_loader  # noqa: E402
from grr_data.shard.run import shard_dataset  # noqa: E402
from grr_data.shard.samples import InputError  # noqa: E402
from grr_data.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARGS = {"split": "70/30", "shard_size": 3, "progress": False}


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def make_folder(root: Path) -> dict[str, str]:
    """12 captioned images in nested folders (JPEG already in stored form, larger JPEG, PNG, upper-case
    .JPG, WebP), one image without a caption, one caption without an image and a hidden AppleDouble
    file; returns {relative image path: caption} of the good ones."""
    good = {}
    for n in range(12):
        sub = ["", "cats/", "cats/old/", "dogs/"][n % 4]
        ext, fmt, size = [("jpg", "JPEG", (384, 288)), ("png", "PNG", (400, 300)), ("JPG", "JPEG", (500, 320)),
                          ("webp", "WEBP", (300, 300))][n % 4]
        name = f"{sub}pic {n:02d}.{ext}"  # a space: keys are sanitised
        put(root / name, jpeg(n, size=size, fmt=fmt))
        put(root / f"{sub}pic {n:02d}.txt", f"  {caption(n)}\n")
        good[name] = caption(n)
    put(root / "dogs" / "lonely.jpg", jpeg(50))  # no caption
    put(root / "cats" / "notes.txt", "a caption whose image went missing")  # no image
    put(root / "cats" / "._pic 01.png", b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata: not listed
    put(root / ".thumbs" / "t.jpg", jpeg(51))  # hidden folder: not listed
    return good


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain") / "mine"
    return root, make_folder(root)


@pytest.fixture(scope="module")
def sharded_folder(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_set") / "out"
    manifest, stats = shard_dataset(folder[0], out, workers=1, **ARGS)
    return out, manifest


def all_samples(out: Path) -> dict[str, dict]:
    return {k: m for samples in read_set(out).values() for k, m in samples.items()}


def test_a_folder_of_captioned_images_is_sharded(sharded_folder, folder, caplog):
    out, manifest = sharded_folder
    _, good = folder
    # the missing caption and the orphan caption are counted like other bad samples
    assert manifest["skipped"] == {"missing_caption": 1, "missing_image": 1}
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == len(good) == 12
    assert manifest["resized_images"] == 9  # all but the three JPEGs already 288 on the short side
    assert manifest["split_rule"].startswith("70/30 by image hash")
    tok = load_tokenizer(None)
    samples = all_samples(out)
    by_path = {json.loads(m["json"])["source_key"]: m for m in samples.values()}
    assert set(by_path) == set(good)
    for path, members in by_path.items():
        meta = json.loads(members["json"])
        assert members["txt"].decode() == good[path] == tok.decode(decode_ids(members["ids"]))
        stored = Image.open(io.BytesIO(members["jpg"]))
        assert stored.format == "JPEG" and min(stored.size) == 288
        assert meta["source"] == "mine" and "image_id" not in meta
        assert meta["original_size"] == list(Image.open(folder[0] / path).size)
    # a JPEG already in the stored form is kept byte for byte
    assert by_path["pic 00.jpg"]["jpg"] == (folder[0] / "pic 00.jpg").read_bytes()
    assert check_dataset(out, progress=False).ok


def test_folder_samples_are_in_sorted_path_order(sharded_folder, folder):
    out, _ = sharded_folder
    for samples in read_set(out).values():
        paths = [json.loads(m["json"])["source_key"] for m in samples.values()]
        assert paths == sorted(paths, key=lambda p: p.split("/"))
        assert list(samples) == sorted(samples)  # keys begin with the listing number
    assert "pic_00" in " ".join(all_samples(out))  # keys keep the file name, sanitised


def test_folder_problems_are_named(folder, tmp_path, caplog):
    caplog.set_level("INFO")
    shard_dataset(folder[0], tmp_path / "out", workers=1, **ARGS)
    assert "dogs/lonely.jpg (missing_caption #1): no lonely.txt beside it" in caplog.text
    assert "cats/notes.txt (missing_image #1): no image named notes.jpg|jpeg|png|webp beside it" in caplog.text
    assert "14 samples listed (2 of them skipped: no image, no caption or a bad line), in 1 chunks" in caplog.text


def test_the_sharded_folder_loads(sharded_folder):
    out, manifest = sharded_folder
    loader = make_loader(out, split="train", batch_size=4, kind="cpu", shuffle=False, num_workers=0)
    batches = list(loader)
    assert batches and batches[0]["images"].shape == (4, 3, 288, 288) and batches[0]["ids"].shape == (4, 65)
    assert sum(int(b["real"].sum()) for b in batches) == manifest["splits"]["train"]["num_samples"]
    assert loader.skipped == {}


def test_workers_and_chunks_do_not_change_the_bytes(folder, sharded_folder, tmp_path, monkeypatch):
    # chunks of 3 listed samples: five chunks over two workers
    monkeypatch.setattr(grr_data.shard.plain, "CHUNK_SIZE", 3)
    manifest, _ = shard_dataset(folder[0], tmp_path / "w2", workers=2, **ARGS)
    shard_dataset(folder[0], tmp_path / "w1", workers=1, **ARGS)
    assert shard_hashes(tmp_path / "w2") == shard_hashes(tmp_path / "w1") == shard_hashes(sharded_folder[0])
    assert manifest == json.loads((sharded_folder[0] / "manifest.json").read_text())


KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
import grr_data.shard.plain
from grr_data.shard.run import shard_dataset
grr_data.shard.plain.CHUNK_SIZE = 3
def die(path):
    os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup runs
shard_dataset(sys.argv[1], sys.argv[2], split="70/30", shard_size=3, workers=1, progress=False, on_shard=die)
"""


def test_a_killed_run_resumes_to_identical_shards(folder, sharded_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_SHARD, str(folder[0]), str(out)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    records = list((out / ".work" / "tars").glob("*.json.gz"))
    assert records and len(list(out.glob("*/*.tar"))) == 1
    # the chunking is part of the run's arguments: another chunk size is another run
    with pytest.raises(FileExistsError, match="other arguments or input"):
        shard_dataset(folder[0], out, workers=1, **ARGS)
    monkeypatch.setattr(grr_data.shard.plain, "CHUNK_SIZE", 3)
    manifest, stats = shard_dataset(folder[0], out, workers=2, **ARGS)
    assert stats["kept_shards"] == 1 and stats["reused_tars"] == len(records)
    assert shard_hashes(out) == shard_hashes(sharded_folder[0])
    assert check_dataset(out, progress=False).ok


def test_a_changed_image_is_not_resumed(tmp_path, monkeypatch):
    root = tmp_path / "in"
    for n in range(4):
        put(root / f"{n}.png", jpeg(n, fmt="PNG"))
        put(root / f"{n}.txt", caption(n))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_SHARD, str(root), str(out)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    put(root / "3.png", jpeg(99, fmt="PNG"))
    monkeypatch.setattr(grr_data.shard.plain, "CHUNK_SIZE", 3)
    with pytest.raises(FileExistsError, match="other arguments or input"):
        shard_dataset(root, out, workers=1, **ARGS)


def test_csv_list(tmp_path):
    images = tmp_path / "images"
    for n in range(6):
        put(images / f"{n}.png", jpeg(n, fmt="PNG"))
    absolute = put(tmp_path / "elsewhere" / "abs.jpg", jpeg(7))
    rows = ["path,caption,extra",
            "images/0.png,a red dog,x",
            "images/0.png,\"the same image, a second caption\",x",  # captions of one image stay together
            "images/1.png,\"a caption over\ntwo lines\",x",
            "images/2.png,a line separator\u2028inside,x",  # not a line end in CSV
            *(f"images/{n}.png,{caption(n)},x" for n in range(3, 6)),
            f"{absolute},an absolute path,x",
            "images/missing.png,a dog,x",
            "images/2.png",  # no caption field
            ",no path,x"]
    lst = put(tmp_path / "pairs.csv", "\ufeff" + "\n".join(rows) + "\n")  # with a spreadsheet's BOM
    manifest, _ = shard_dataset(lst, tmp_path / "out", split="50/50", shard_size=4, workers=1, progress=False)
    assert manifest["skipped"] == {"missing_image": 1, "bad_line": 2}
    samples = all_samples(tmp_path / "out")
    by_line = {json.loads(m["json"])["source_key"]: m for m in samples.values()}
    assert sorted(by_line, key=lambda k: int(k.split(":")[1])) == [f"pairs.csv:{i}" for i in (2, 3, 4, 6, 7, 8, 9, 10)]
    assert by_line["pairs.csv:4"]["txt"].decode() == "a caption over\ntwo lines"
    assert by_line["pairs.csv:6"]["txt"].decode() == "a line separator\u2028inside"
    assert by_line["pairs.csv:10"]["jpg"] == absolute.read_bytes()
    homes = {name for name, s in read_set(tmp_path / "out").items() for k, m in s.items()
             if json.loads(m["json"])["source_key"] in ("pairs.csv:2", "pairs.csv:3")}
    assert len(homes) == 1
    assert manifest["duplicate_images"] == 1  # the second row of images/0.png shares its bytes
    assert check_dataset(tmp_path / "out", progress=False).ok


def test_jsonl_list_names_its_bad_lines(tmp_path, caplog):
    for n in range(4):
        put(tmp_path / "img" / f"{n}.jpg", jpeg(n, size=(600, 450)))
    lines = [json.dumps({"path": "img/0.jpg", "caption": "a red dog"}),
             json.dumps({"path": "img/1.jpg", "caption": caption(1)}),
             '{"path": "img/2.jpg", "caption": "cut off',  # line 3: not JSON
             "",  # blank lines are ignored
             json.dumps({"path": "img/3.jpg"}),  # line 5: no caption
             json.dumps({"path": str(tmp_path / "img" / "2.jpg"), "caption": "an absolute path"})]
    lst = put(tmp_path / "pairs.jsonl", "\n".join(lines) + "\n")
    manifest, _ = shard_dataset(lst, tmp_path / "out", shard_size=10, workers=1, progress=False)
    assert manifest["skipped"] == {"bad_line": 2}
    assert "pairs.jsonl:3 (bad_line #1): not valid JSON" in caplog.text
    assert 'pairs.jsonl:5 (bad_line #2): not an object with strings "path" and "caption"' in caplog.text
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == 3
    assert manifest["resized_images"] == 3
    assert check_dataset(tmp_path / "out", progress=False).ok


def test_unusable_inputs_are_one_line_errors(tmp_path, folder):
    cases = {
        "bad_header.csv": ("file,text\na.jpg,a dog\n", r"bad_header\.csv: its first line must be a header naming "
                                                       r"the columns `path` and `caption` \(found 'file', 'text'\)"),
        "empty.csv": ("path,caption\n", r"empty\.csv: no usable sample"),
        "all_bad.jsonl": ("path,caption\nx.jpg,a dog\n", r"all_bad\.jsonl: no usable sample \(all_bad\.jsonl:1: "
                                                         r"not valid JSON"),
        "notes.txt": ("a dog", r"notes\.txt: not a \.csv or \.jsonl list"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(InputError, match=message):
            shard_dataset(put(tmp_path / name, text), tmp_path / f"out_{name}", workers=1, progress=False)
        assert not (tmp_path / f"out_{name}").exists()
    put(tmp_path / "latin1.csv", "path,caption\nx.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.csv: not UTF-8 text \(byte 22\); save it as UTF-8"):
        shard_dataset(tmp_path / "latin1.csv", tmp_path / "o", workers=1, progress=False)
    (tmp_path / "nothing").mkdir()
    put(tmp_path / "nothing" / "readme.md", "no images here")
    with pytest.raises(InputError, match=r"no \.tar files .* and no images \(jpg, jpeg, png, webp\) with captions"):
        shard_dataset(tmp_path / "nothing", tmp_path / "o", workers=1, progress=False)
    with pytest.raises(InputError, match="no such file or folder"):
        shard_dataset(tmp_path / "nope", tmp_path / "o", workers=1, progress=False)
    with pytest.raises(InputError, match="--split source needs fetch output with source splits"):
        shard_dataset(folder[0], tmp_path / "o", split="source", workers=1, progress=False)


def test_cli_shards_a_folder_and_check_passes(folder, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "shard", "--input", str(folder[0]), "--out", str(tmp_path / "set"),
                                 "--workers", "1", "--shard-size", "5"])
    assert result.exit_code == 0, result.output
    assert "skipped: missing_caption 1, missing_image 1" in result.output
    result = runner.invoke(app, ["data", "check", str(tmp_path / "set")])
    assert result.exit_code == 0 and "ok:" in result.output, result.output
    put(tmp_path / "x.tsv", "a\tb\n")
    result = runner.invoke(app, ["data", "shard", "--input", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: ") and "x.tsv: not a .csv or .jsonl" in result.output
