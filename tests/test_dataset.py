"""`Manifest.read`: what a sharded set's manifest says, and one-line errors when it cannot say it."""

import json

import pytest
from shardset import VOCAB_SIZE, make_shardset

from grr_data.format.layout import LAYOUT_VERSION, SEQ_LEN, SpecialIds
from grr_data.format.manifest import Manifest


def _manifest(**changes) -> dict:
    special = SpecialIds.for_vocab(300)
    manifest = {
        "layout_version": LAYOUT_VERSION, "seq_len": SEQ_LEN,
        "tokenizer": {"name": "grr-sample-tokenizer", "vocab_size": 300, "pad": special.pad, "eos": special.eos,
                      "bos": special.bos, "cls": special.cls},
        "splits": {
            "train": {"num_samples": 7, "shards": [{"path": "train/shard-000000.tar", "num_samples": 7, "sha256": "ab"}]},
            "val": {"num_samples": 3, "shards": [{"path": "val/shard-000000.tar", "num_samples": 3}]},
        },
    }
    manifest.update(changes)
    return manifest


def _write(tmp_path, manifest) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest) if isinstance(manifest, dict) else manifest)


def test_reads_what_the_shard_writer_records(tmp_path):
    root = make_shardset(tmp_path / "set", shard_sizes=(3, 2), split="val")
    info = Manifest.read(root)
    raw = json.loads((root / "manifest.json").read_text())
    assert info.split_sizes == {"val": 5}
    assert info.num_samples("val") == 5
    assert [s.num_samples for s in info.splits["val"].shards] == [3, 2]
    assert info.special == SpecialIds.for_vocab(VOCAB_SIZE)
    assert info.tokenizer.to_dict() == raw["tokenizer"]  # what runs record, unchanged
    assert info.split_mode is None and dict(info.overlapping_splits) == {}
    with pytest.raises(AttributeError):
        info.split_mode = "paper"  # frozen


def test_paper_split_and_its_overlaps(tmp_path):
    manifest = _manifest(split_mode="paper", overlapping_splits={"train/val": 2})
    manifest["tokenizer"]["files_sha256"] = {"spiece.model": "ab12"}
    _write(tmp_path, manifest)
    info = Manifest.read(tmp_path)
    assert info.split_mode == "paper" and dict(info.overlapping_splits) == {"train/val": 2}
    assert list(info.splits) == ["train", "val"]
    assert info.tokenizer.name == "grr-sample-tokenizer" and info.tokenizer.vocab_size == 300
    record = info.tokenizer.to_dict()
    assert record == manifest["tokenizer"]  # every field of the entry, a fingerprint included
    record["files_sha256"]["spiece.model"] = "changed"
    assert info.tokenizer.to_dict() == manifest["tokenizer"]  # a copy


def test_unknown_split_names_the_ones_there(tmp_path):
    _write(tmp_path, _manifest())
    with pytest.raises(ValueError, match=r"no split 'test'; the set has train, val"):
        Manifest.read(tmp_path).num_samples("test")


@pytest.mark.parametrize("content, reason", [
    (None, "not found"),
    ("{not json", "cannot read the set's manifest"),
    ("[1, 2]", "cannot read the set's manifest"),
    (_manifest(tokenizer={"name": "x"}), "missing 'pad'"),
    ({k: v for k, v in _manifest().items() if k != "splits"}, "missing 'splits'"),
])
def test_missing_or_unreadable_manifest_is_one_line(tmp_path, content, reason):
    if content is not None:
        _write(tmp_path, content)
    with pytest.raises(ValueError) as err:
        Manifest.read(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "manifest.json") in message and reason in message
    assert "grr data shard" in message


def test_other_layout_is_refused(tmp_path):
    _write(tmp_path, _manifest(layout_version=LAYOUT_VERSION + 1))
    with pytest.raises(ValueError, match="re-shard the set"):
        Manifest.read(tmp_path)
