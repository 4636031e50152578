"""The local converters (roco, flickr30k, mscoco from folders) and the shared pieces; no img2dataset here."""

import csv
import io
import json
import tarfile
import zipfile

import pyarrow.parquet as pq
import pytest
from fetch_helpers import jpeg, read_split
from PIL import Image

from grr_data.fetch import FetchError, FetchOptions, fetch
from grr_data.fetch.common import failure_reason
from grr_data.fetch.convert import resize_to_jpeg


def test_resize_makes_the_shorter_side_288():
    for size in [(100, 50), (1000, 600), (288, 400)]:
        jpg, info = resize_to_jpeg(jpeg(size))
        with Image.open(io.BytesIO(jpg)) as img:
            assert min(img.size) == 288 and img.format == "JPEG"
            assert img.size == (info["width"], info["height"])
            assert abs(img.size[0] / img.size[1] - size[0] / size[1]) < 0.02
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        resize_to_jpeg(b"not an image")


@pytest.mark.parametrize("message,reason", [
    ("HTTP Error 404: Not Found", "http_404"),
    ("<urlopen error timed out>", "timeout"),
    ("cannot identify image file <_io.BytesIO object at 0x7f>", "not_an_image"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("missing file: a.jpg not in x.zip", "missing_file"),
    ("image too small", "image_too_small"),
    ("something new", "other"),
    ("<urlopen error [Errno -3] Temporary failure in name resolution>", "dns"),
    ("<urlopen error [Errno -5] No address associated with hostname>", "dns"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns"),
])
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason


def test_dns_failures_get_resolver_advice_once():
    from grr_data.fetch.common import summary_lines

    def split(failures):
        return {"num_samples": 5, "num_attempted": 5 + sum(failures.values()), "num_shards": 1, "failures": failures}

    data = {"dataset": "cc12m", "elapsed_s": 3.0, "warnings": [],
            "splits": {"train": split({"dns": 7, "http_404": 1}), "val": split({"dns": 2})}}
    notes = [line for line in summary_lines(data) if "DNS" in line]
    assert len(notes) == 1 and notes[0].startswith("  note: 9 URLs failed in the DNS look-up")
    assert "--retry-failed" in notes[0]
    data["splits"] = {"train": split({"http_404": 1})}
    assert not [line for line in summary_lines(data) if "DNS" in line]


@pytest.fixture
def roco_dir(tmp_path):
    """A ROCO-v2-like folder: images zips (one corrupt image, one missing) and caption CSVs."""
    folder = tmp_path / "roco"
    folder.mkdir()
    ids = {"train": [f"ROCO_tr_{i}" for i in range(5)], "valid": ["ROCO_va_0", "ROCO_va_1"], "test": ["ROCO_te_0"]}
    for split, names in ids.items():
        with open(folder / f"{split}_captions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "Caption"])
            for name in names:
                writer.writerow([name, f"CT scan {name}, with a comma"])
        with zipfile.ZipFile(folder / f"{split}_images.zip", "w") as zf:
            for i, name in enumerate(names):
                if name == "ROCO_tr_4":
                    continue  # listed in the CSV, absent from the zip
                data = b"garbage" if name == "ROCO_tr_3" else jpeg((300 + 10 * i, 200))
                zf.writestr(f"{split}/{name}.jpg", data)
    return folder


def test_roco_clean_split(roco_dir, tmp_path):
    data = fetch("roco", FetchOptions(out=tmp_path / "out", source=roco_dir, shard_size=2))
    splits = data["splits"]
    assert {s: v["num_samples"] for s, v in splits.items()} == {"train": 3, "val": 2, "test": 1}
    assert splits["train"]["failures"] == {"missing_file": 1, "not_an_image": 1}
    assert splits["train"]["num_shards"] == 3
    train = read_split(tmp_path / "out" / "train")
    assert {m["source_split"] for m in train} == {"train"}
    assert all(min(m["size"]) == 288 for m in train)
    assert train[0]["caption"] == "CT scan ROCO_tr_0, with a comma" and train[0]["image_id"] == "ROCO_tr_0"
    manifest = json.loads((tmp_path / "out" / "fetch_manifest.json").read_text())
    assert manifest["split_mode"] == "clean" and manifest["dataset"] == "roco"
    assert all(len(s.get("sha256", "")) == 64 for s in manifest["sources"])
    assert any("train: 5 pairs in the source, the manifest expects 59958" in w for w in manifest["warnings"])
    rows = pq.read_table(tmp_path / "out" / "train" / "00001.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["success", "failed_to_resize"]


def test_roco_paper_split_warns_and_leaks(roco_dir, tmp_path, capsys):
    data = fetch("roco", FetchOptions(out=tmp_path / "out", source=roco_dir, paper_split=True))
    assert "WARNING: --paper-split" in capsys.readouterr().err
    assert any("inside its training" in w for w in data["warnings"])
    train = read_split(tmp_path / "out" / "train")
    val = read_split(tmp_path / "out" / "val")
    assert data["splits"]["train"]["num_samples"] == 3 + 2
    assert {m["image_id"] for m in val} <= {m["image_id"] for m in train}
    assert data["source_splits"]["train"] == ["train", "valid"]


def test_roco_resumes_without_redoing_finished_shards(roco_dir, tmp_path):
    out = tmp_path / "out"
    fetch("roco", FetchOptions(out=out, source=roco_dir, shard_size=2))
    first = (out / "train" / "00000.tar").stat().st_mtime_ns
    before = read_split(out / "train")
    # an interrupted run: no manifest yet, the last shard never finished
    (out / "fetch_manifest.json").unlink()
    for path in (out / "train").glob("00002*"):
        path.unlink()
    data = fetch("roco", FetchOptions(out=out, source=roco_dir, shard_size=2))
    assert (out / "train" / "00000.tar").stat().st_mtime_ns == first
    assert read_split(out / "train") == before
    assert data["splits"]["train"]["num_samples"] == 3


def test_missing_sources_give_clear_errors(tmp_path):
    with pytest.raises(FetchError, match="pass it with --from"):
        fetch("roco", FetchOptions(out=tmp_path / "a"))
    with pytest.raises(FetchError, match="--from .*nowhere(.tsv)?: no such file"):
        fetch("flickr30k", FetchOptions(out=tmp_path / "b", source=tmp_path / "nowhere"))
    with pytest.raises(FetchError, match="--from .*nowhere(.tsv)?: no such file"):
        fetch("cc12m", FetchOptions(out=tmp_path / "c", source=tmp_path / "nowhere.tsv"))
    with pytest.raises(FetchError, match="--from .*nowhere(.tsv)?: no such file"):
        fetch("mscoco", FetchOptions(out=tmp_path / "d", source=tmp_path / "nowhere"))
    (tmp_path / "roco").mkdir()
    with pytest.raises(FetchError, match="train_captions.csv"):
        fetch("roco", FetchOptions(out=tmp_path / "e", source=tmp_path / "roco"))


def karpathy(images: dict[str, tuple[str, int]]) -> dict:
    return {"dataset": "flickr30k", "images": [
        {"filename": name, "split": split, "imgid": i,
         "sentences": [{"raw": f"caption {k} of {name} ", "tokens": []} for k in range(n)]}
        for i, (name, (split, n)) in enumerate(images.items())]}


@pytest.mark.parametrize("kind", ["folder", "zip", "tar"])
def test_flickr30k_karpathy_split(tmp_path, kind):
    images = {"1.jpg": ("train", 5), "2.jpg": ("train", 5), "3.jpg": ("val", 5), "4.jpg": ("test", 5),
              "5.jpg": ("test", 5)}
    raw = tmp_path / "raw"
    raw.mkdir()
    files = {name: jpeg((500, 333)) for name in images if name != "5.jpg"}  # 5.jpg is missing
    if kind == "folder":
        source = raw / "flickr30k-images"
        source.mkdir()
        for name, data in files.items():
            (source / name).write_bytes(data)
        (source / "dataset_flickr30k.json").write_text(json.dumps(karpathy(images)))
    else:
        (raw / "dataset_flickr30k.json").write_text(json.dumps(karpathy(images)))
        source = raw / f"flickr30k-images.{kind}"
        if kind == "zip":
            with zipfile.ZipFile(source, "w") as zf:
                for name, data in files.items():
                    zf.writestr(f"flickr30k-images/{name}", data)
        else:
            with tarfile.open(source, "w:gz") as tar:
                for name, data in files.items():
                    info = tarfile.TarInfo(f"flickr30k-images/{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    data = fetch("flickr30k", FetchOptions(out=tmp_path / "out", source=source))
    assert {s: v["num_samples"] for s, v in data["splits"].items()} == {"train": 10, "val": 5, "test": 5}
    assert data["splits"]["test"]["failures"] == {"missing_file": 5}
    train = read_split(tmp_path / "out" / "train")
    assert sorted({m["image_id"] for m in train}) == ["1", "2"]
    assert train[0]["caption"] == "caption 0 of 1.jpg" and train[0]["size"] == (432, 288)


def test_flickr30k_needs_the_karpathy_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(FetchError, match="dataset_flickr30k.json not found"):
        fetch("flickr30k", FetchOptions(out=tmp_path / "out", source=tmp_path / "imgs"))


def coco_json(images: dict[int, int], url: str = "http://127.0.0.1:9/{}") -> dict:
    """A COCO captions file: {image id: number of captions}."""
    anns, n = [], 0
    for image_id, count in images.items():
        for k in range(count):
            n += 1
            anns.append({"id": n, "image_id": image_id, "caption": f"A photo {image_id} number {k}.\n"})
    return {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "coco_url": url.format(f"{i:012d}.jpg")}
                       for i in images], "annotations": anns}


def test_mscoco_from_local_folders(tmp_path):
    source = tmp_path / "coco"
    (source / "annotations").mkdir(parents=True)
    splits = {"train": {1: 5, 2: 3, 3: 0}, "val": {7: 2}}
    for split, images in splits.items():
        (source / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(coco_json(images)))
        (source / f"{split}2017").mkdir()
        for i in images:
            (source / f"{split}2017" / f"{i:012d}.jpg").write_bytes(jpeg((640, 480)))
    data = fetch("mscoco", FetchOptions(out=tmp_path / "out", source=source))
    assert {s: v["num_samples"] for s, v in data["splits"].items()} == {"train": 8, "val": 2}
    train = read_split(tmp_path / "out" / "train")
    assert [m["image_id"] for m in train] == ["1"] * 5 + ["2"] * 3
    assert train[0]["caption"] == "A photo 1 number 0." and train[0]["size"] == (384, 288)


def test_staged_images_come_in_key_order_whatever_the_download_order(tmp_path):
    import pyarrow as pa

    from grr_data.fetch.staged import _staged_images

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    rows = []
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key in ["000000002", "000000000", "000000003"]:  # as img2dataset's threads finished
            meta = {"url": f"u{key}", "image_id": f"im{key}", "source_split": "train", "captions": '["c"]',
                    "width": 1, "height": 1, "original_width": 1, "original_height": 1, "sha256": key}
            add(tar, f"{key}.jpg", key.encode())
            add(tar, f"{key}.json", json.dumps(meta).encode())
            rows.append({"key": key, "url": f"u{key}", "status": "success", "error_message": None,
                         "image_id": f"im{key}", "source_split": "train", "captions": '["c"]'})
    rows.insert(1, {"key": "000000001", "url": "u1", "status": "failed_to_download", "error_message": "404",
                    "image_id": "im000000001", "source_split": "train", "captions": '["c"]'})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")

    images = list(_staged_images(tmp_path))
    fetched = [im for im in images if im.error is None]
    assert [im.image_id for im in fetched] == ["im000000000", "im000000002", "im000000003"]
    assert [im.read() for im in fetched] == [b"000000000", b"000000002", b"000000003"]
    assert [im.image_id for im in images if im.error] == ["im000000001"]


def coco_karpathy(splits: dict[int, str]) -> dict:
    """A stand-in for Karpathy's dataset_coco.json: {cocoid: split}, 2014 file names as in the real one."""
    return {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
         "sentences": [{"raw": "ignored: captions come from the 2017 annotations", "tokens": []}]}
        for i, split in splits.items()]}


@pytest.fixture
def coco_folders(tmp_path):
    source = tmp_path / "coco"
    (source / "annotations").mkdir(parents=True)
    for split, images in {"train": {1: 5, 2: 3, 3: 6}, "val": {7: 2, 8: 1}}.items():
        (source / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(coco_json(images)))
        (source / f"{split}2017").mkdir()
        for i in images:
            (source / f"{split}2017" / f"{i:012d}.jpg").write_bytes(jpeg((640, 480), (20 * i, 50, 90)))
    return source


def test_mscoco_karpathy_split(coco_folders, tmp_path):
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps(coco_karpathy({1: "train", 2: "restval", 3: "test", 7: "val", 8: "test"})))
    out = tmp_path / "out"
    data = fetch("mscoco", FetchOptions(out=out, source=coco_folders, split="karpathy", karpathy=karpathy))
    assert {s: v["num_samples"] for s, v in data["splits"].items()} == {"train": 8, "val": 2, "test": 7}
    ids = {s: [m["image_id"] for m in read_split(out / s)] for s in ("train", "val", "test")}
    assert ids == {"train": ["1"] * 5 + ["2"] * 3, "val": ["7"] * 2, "test": ["3"] * 6 + ["8"]}
    test = read_split(out / "test")
    assert test[0]["caption"] == "A photo 3 number 0." and test[0]["source_split"] == "test"
    assert test[-1]["size"] == (384, 288)  # image 8, read from val2017/ although it is a test image
    manifest = json.loads((out / "fetch_manifest.json").read_text())
    assert manifest["split"] == "karpathy" and "Karpathy" in manifest["split_rule"]
    assert any(s.get("path", "").endswith("dataset_coco.json") and s["sha256"] for s in manifest["sources"])
    assert "train: 2 images in the source, the manifest expects 113287" in manifest["warnings"]
    # the same folder asked for the official split, and the default official fetch records its split
    with pytest.raises(FetchError, match="holds mscoco with the karpathy split; fetch the official split into another"):
        fetch("mscoco", FetchOptions(out=out, source=coco_folders))
    official = fetch("mscoco", FetchOptions(out=tmp_path / "official", source=coco_folders))
    assert official["split"] == "official" and set(official["splits"]) == {"train", "val"}


def test_mscoco_karpathy_errors(coco_folders, tmp_path):
    with pytest.raises(FetchError, match="dataset_coco.json not found .*pass it with --karpathy"):
        fetch("mscoco", FetchOptions(out=tmp_path / "a", source=coco_folders, split="karpathy"))
    (coco_folders / "dataset_coco.json").write_text(json.dumps(coco_karpathy({1: "train", 99: "test"})))
    with pytest.raises(FetchError, match=r"dataset_coco.json: 1 image id\(s\) of the Karpathy split have no "
                                         "captions in the 2017 annotations \\(first: 99\\)"):
        fetch("mscoco", FetchOptions(out=tmp_path / "b", source=coco_folders, split="karpathy"))
    (coco_folders / "dataset_coco.json").write_text(json.dumps({"images": [{"cocoid": 1}]}))
    with pytest.raises(FetchError, match="not Karpathy's dataset_coco.json \\(missing 'split'\\)"):
        fetch("mscoco", FetchOptions(out=tmp_path / "c", source=coco_folders, split="karpathy"))
    with pytest.raises(FetchError, match="--split 5k: mscoco's splits are official and karpathy"):
        fetch("mscoco", FetchOptions(out=tmp_path / "d", source=coco_folders, split="5k"))
    with pytest.raises(FetchError, match="--split is for mscoco"):
        fetch("flickr30k", FetchOptions(out=tmp_path / "e", source=coco_folders, split="karpathy"))
    with pytest.raises(FetchError, match="--karpathy is for mscoco with --split karpathy"):
        fetch("mscoco", FetchOptions(out=tmp_path / "f", source=coco_folders, karpathy=coco_folders / "x.json"))
