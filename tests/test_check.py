"""`grr data check`: passes on a good set, names the file for each kind of damage; the CLI."""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"

from test_shard import make_fetch_output  # noqa: E402

from grr_cli.main import app  # noqa: E402
from grr_data.check import check_dataset  # noqa: E402
from grr_data.format.records import ShardWriter, decode_ids, encode_ids, iter_tar_samples  # noqa: E402
from grr_data.infra.files import sha256_file


@pytest.fixture(scope="module")
def good_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    make_fetch_output(root / "in")
    result = CliRunner().invoke(app, ["data", "shard", "--input", str(root / "in"), "--out", str(root / "set"),
                                      "--split", "60/40", "--shard-size", "4", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "skipped: none" in result.output
    return root / "set"


@pytest.fixture
def data(good_set, tmp_path):
    shutil.copytree(good_set, tmp_path / "set")
    return tmp_path / "set"


def manifest_of(root):
    return json.loads((root / "manifest.json").read_text())


def rewrite_shard(root, rel_path, edit):
    """Rewrite one shard through `edit(samples) -> samples` and record its new sha256 and count, so
    that only the damage `edit` plants is left for the checker to find."""
    path = root / rel_path
    samples = edit(list(iter_tar_samples(path)))
    with ShardWriter(path) as writer:
        for key, members in samples:
            writer.write(key, members)
    manifest = manifest_of(root)
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["path"] == rel_path:
                split["num_samples"] += len(samples) - entry["num_samples"]
                entry.update(sha256=sha256_file(path), num_samples=len(samples))
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_good_set_passes(good_set):
    report = check_dataset(good_set, progress=False)
    assert report.ok, report.problems
    assert sum(report.num_samples.values()) == 36 and report.num_shards >= 9
    result = CliRunner().invoke(app, ["data", "check", str(good_set)])
    assert result.exit_code == 0 and "ok:" in result.output


def test_flipped_byte_is_caught(data):
    path = data / "train" / "shard-000000.tar"
    raw = bytearray(path.read_bytes())
    raw[2000] ^= 0xFF
    path.write_bytes(bytes(raw))
    problems = check_dataset(data, progress=False).problems
    assert any(str(path) in p and "sha256" in p for p in problems)
    result = CliRunner().invoke(app, ["data", "check", str(data)])
    assert result.exit_code == 1 and "shard-000000.tar" in result.output


def test_deleted_shard_and_index_are_caught(data):
    (data / "val" / "shard-000000.tar").unlink()
    (data / "train" / "shard-000001.idx").unlink()
    problems = check_dataset(data, progress=False).problems
    assert any("val/shard-000000.tar: missing" in p for p in problems)
    assert any("train/shard-000001.tar: index shard-000001.idx missing" in p for p in problems)


def test_edited_ids_are_caught(data):
    def break_layout(samples):
        ids = decode_ids(samples[1][1]["ids"])
        ids[0] = ids[1]  # no BOS
        samples[1][1]["ids"] = encode_ids(ids)
        return samples

    rewrite_shard(data, "train/shard-000000.tar", break_layout)
    problems = check_dataset(data, progress=False).problems
    assert len(problems) == 1 and "train/shard-000000.tar: sample" in problems[0] and "BOS" in problems[0]


def test_missing_member_stale_index_and_unlisted_shard_are_caught(data):
    def drop_txt(samples):
        del samples[0][1]["txt"]
        return samples

    index = (data / "train" / "shard-000001.idx").read_text()
    rewrite_shard(data, "train/shard-000001.tar", drop_txt)
    (data / "train" / "shard-000002.idx").write_text(index)
    shutil.copy(data / "train" / "shard-000000.tar", data / "train" / "shard-000099.tar")
    problems = "\n".join(check_dataset(data, progress=False).problems)
    assert "shard-000001.tar: sample" in problems and "expected ['ids', 'jpg', 'json', 'txt']" in problems
    assert "shard-000002.tar: index shard-000002.idx does not match" in problems
    assert "shard-000099.tar: on disk but not listed" in problems


def test_an_image_in_two_splits_is_caught(data):
    _, val_members = next(iter_tar_samples(data / "val" / "shard-000000.tar"))

    def add_val_image(samples):
        return samples + [("leaked", dict(samples[0][1], jpg=val_members["jpg"]))]

    rewrite_shard(data, "train/shard-000000.tar", add_val_image)
    problems = check_dataset(data, progress=False).problems
    assert len(problems) == 1 and "is in splits train (train/shard-000000.tar) and val" in problems[0]
    assert "val/shard-000000.tar" in problems[0]


def test_missing_manifest_is_reported(tmp_path):
    problems = check_dataset(tmp_path, progress=False).problems
    assert len(problems) == 1 and "manifest.json" in problems[0] and "did the shard run finish" in problems[0]


def test_stray_folders_leftovers_and_bad_entries_are_caught(data):
    (data / "test").mkdir()
    shutil.copy(data / "train" / "shard-000000.tar", data / "test" / "shard-000000.tar")
    shutil.copy(data / "train" / "shard-000000.tar", data / "val" / "shard-000042.tar.tmp")
    shutil.copy(data / "train" / "shard-000000.idx", data / "train" / "shard-000077.idx")
    problems = "\n".join(check_dataset(data, progress=False).problems)
    for name in ("test/shard-000000.tar", "val/shard-000042.tar.tmp", "train/shard-000077.idx"):
        assert f"{name}: on disk but not listed" in problems
    manifest = manifest_of(data)
    del manifest["splits"]["val"]["shards"][0]["path"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    problems = check_dataset(data, progress=False).problems
    assert len(problems) == 1 and "split 'val' shard #0 has no path" in problems[0]


def test_the_report_is_the_same_for_any_worker_count(data):
    """Shards are read and hashed in parallel; the report (problems in order, counts, exit code and
    output of the CLI) does not depend on how many workers did it, on a good or a damaged set."""

    def reports():
        found = [check_dataset(data, progress=False, workers=n) for n in (1, 2, 3)]
        outputs = [CliRunner().invoke(app, ["data", "check", str(data), "--workers", str(n)]) for n in (1, 2)]
        assert found[1:] == found[:1] * 2
        # all but the progress bar, whose speed differs
        lines = [[line for line in out.output.splitlines() if "shard/s" not in line] for out in outputs]
        assert outputs[0].exit_code == outputs[1].exit_code and lines[0] == lines[1]
        return found[0], outputs[0]

    report, _ = reports()
    assert report.ok and report.num_shards >= 9
    # a flipped byte in one shard, a key stored twice across shards, a val image leaked into train
    path = data / "train" / "shard-000001.tar"
    raw = bytearray(path.read_bytes())
    raw[2000] ^= 0xFF
    path.write_bytes(bytes(raw))
    val_key, val_members = next(iter_tar_samples(data / "val" / "shard-000000.tar"))
    rewrite_shard(data, "train/shard-000000.tar",
                  lambda samples: samples + [(val_key, dict(samples[0][1], jpg=val_members["jpg"]))])
    report, result = reports()
    assert len(report.problems) == 4, report.problems
    assert result.exit_code == 1 and "4 problem(s)" in result.output
    starts = ["train/shard-000001.tar: sha256 differs", "train/shard-000001.tar: sample 00001_",
              f"val/shard-000000.tar: key {val_key} is stored twice", "val/shard-000000.tar: image "]
    assert [p.startswith(f"{data}/{start}") for p, start in zip(report.problems, starts, strict=True)] == [True] * 4
