"""`--split source`: ROCO's declared paper-split overlap survives sharding and checking; a flat
input split by each sample's json `source_split`."""

import csv
import json
import os
import shutil
import zipfile

from typer.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"

from test_check import rewrite_shard  # noqa: E402
from test_shard import caption, jpeg, read_set, write_tar  # noqa: E402

from grr_cli.main import app  # noqa: E402
from grr_data.check import check_dataset  # noqa: E402
from grr_data.fetch import FetchOptions, fetch  # noqa: E402
from grr_data.format.records import iter_tar_samples  # noqa: E402
from grr_data.shard.run import shard_dataset  # noqa: E402


def make_roco(folder):
    """A ROCO-v2-like folder: 4 train, 2 valid, 1 test pictures (all distinct), caption CSVs."""
    folder.mkdir()
    ids = {"train": [f"ROCO_tr_{i}" for i in range(4)], "valid": ["ROCO_va_0", "ROCO_va_1"], "test": ["ROCO_te_0"]}
    for n, (split, names) in enumerate(ids.items()):
        with open(folder / f"{split}_captions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "Caption"])
            writer.writerows([name, f"CT scan of the chest {name}"] for name in names)
        with zipfile.ZipFile(folder / f"{split}_images.zip", "w") as zf:
            for i, name in enumerate(names):
                zf.writestr(f"{split}/{name}.jpg", jpeg(10 * n + i, size=(400, 320)))


def test_roco_paper_split_overlap_is_kept_declared_and_checked(tmp_path):
    make_roco(tmp_path / "roco")
    fetched = tmp_path / "fetched"
    fetch("roco", FetchOptions(out=fetched, source=tmp_path / "roco", paper_split=True))
    result = CliRunner().invoke(app, ["data", "shard", "--input", str(fetched), "--out", str(tmp_path / "set"),
                                      "--split", "source", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "WARNING: 2 images are in both train/val (split_mode 'paper'" in result.output
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["split_mode"] == "paper" and manifest["overlapping_splits"] == {"train/val": 2}
    assert {n: s["num_samples"] for n, s in manifest["splits"].items()} == {"train": 6, "val": 2, "test": 1}
    assert manifest["skipped"] == {} and manifest["duplicate_images"] == 0
    stored = read_set(tmp_path / "set")
    val_ids = {json.loads(m["json"])["image_id"] for m in stored["val"].values()}
    assert val_ids == {"ROCO_va_0", "ROCO_va_1"}
    assert val_ids < {json.loads(m["json"])["image_id"] for m in stored["train"].values()}

    report = check_dataset(tmp_path / "set", progress=False)
    assert report.ok, report.problems
    assert len(report.warnings) == 1 and report.warnings[0].startswith("train/val: 2 images are in both splits")
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "set")])
    assert result.exit_code == 0 and "warning: train/val: 2 images" in result.output

    # an undeclared overlap still fails: a train picture planted into test
    leaky = tmp_path / "leaky"
    shutil.copytree(tmp_path / "set", leaky)
    _, train_members = next(iter_tar_samples(leaky / "train" / "shard-000000.tar"))
    rewrite_shard(leaky, "test/shard-000000.tar", lambda s: s + [("leaked", dict(s[0][1], jpg=train_members["jpg"]))])
    problems = check_dataset(leaky, progress=False).problems
    assert len(problems) == 1 and "is in splits train" in problems[0] and "and test" in problems[0]
    # and so does a train/val overlap other than the declared one
    manifest["overlapping_splits"] = {"train/val": 1}
    (leaky / "manifest.json").write_text(json.dumps(manifest))
    problems = check_dataset(leaky, progress=False).problems
    assert any("declares 1 images shared by train/val, the shards share 2" in p for p in problems)

    # without the paper declaration the same folders give the clean split: the copies are dropped
    fetch_manifest = json.loads((fetched / "fetch_manifest.json").read_text())
    (fetched / "fetch_manifest.json").write_text(json.dumps(dict(fetch_manifest, split_mode="clean")))
    clean, _ = shard_dataset(fetched, tmp_path / "clean", split="source", workers=1, progress=False)
    assert clean["skipped"] == {"duplicate_across_splits": 2} and "overlapping_splits" not in clean
    assert {n: s["num_samples"] for n, s in clean["splits"].items()} == {"train": 4, "val": 2, "test": 1}


def test_source_split_of_a_flat_input_comes_from_the_json(tmp_path):
    names = ["train", "validation", "test", "dev", "TRAIN", None, "holdout"]
    write_tar(tmp_path / "in" / "00000.tar", [
        {"key": f"{i:04d}", "jpg": jpeg(i), "txt": caption(i), "json": {} if name is None else {"source_split": name}}
        for i, name in enumerate(names)])
    manifest, _ = shard_dataset(tmp_path / "in", tmp_path / "out", split="source", workers=1, progress=False)
    assert manifest["split_rule"] == "source splits"
    assert manifest["skipped"] == {"no_source_split": 2}
    stored = read_set(tmp_path / "out")
    assert {n: sorted(k[-1] for k in s) for n, s in stored.items()} == {"train": ["0", "4"], "val": ["1", "3"],
                                                                         "test": ["2"]}
    assert all(json.loads(m["json"])["split"] == n for n, s in stored.items() for m in s.values())
    assert check_dataset(tmp_path / "out", progress=False).ok


def test_a_known_image_id_decides_before_the_content_hash():
    import hashlib

    from grr_data.shard.split import SampleIdentity, SplitAssigner, SplitRule

    rule = SplitRule.parse("50/50")
    split_of = {i: rule.split_of_hash(hashlib.sha256(f"image_id:id{i}".encode()).digest()) for i in range(20)}
    a = next(i for i in split_of if split_of[i] == "train")
    b = next(i for i in split_of if split_of[i] == "val")
    x, y, z = (hashlib.sha256(t).digest() for t in (b"x", b"y", b"z"))
    assigner = SplitAssigner(rule)
    assert assigner.assign(SampleIdentity(x, f"id{b}")) == "val"
    assert assigner.assign(SampleIdentity(y, f"id{a}")) == "train"
    assert assigner.assign(SampleIdentity(z, f"id{a}")) == "train"  # a new picture of image a: a's split
    # a caption of image a carrying b's bytes: following either would put a or those bytes in two splits
    assert assigner.assign(SampleIdentity(x, f"id{a}")) is None
    assert assigner.assign(SampleIdentity(y, None)) == "train"  # no id: the content decides
