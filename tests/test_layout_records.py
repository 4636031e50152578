"""Token layout and shard record contracts (grr_data/format/layout.py, grr_data/format/records.py)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from grr_data.format.layout import (
    CLS_INDEX,
    SEQ_LEN,
    SpecialIds,
    build_layout,
    caption_word_ids,
    check_layout,
)
from grr_data.format.records import (
    ShardWriter,
    decode_ids,
    index_path,
    iter_tar_samples,
    read_index,
    sample_members,
)

SPECIAL = SpecialIds.for_vocab(32102)


def test_special_ids_follow_t5_numbering():
    assert (SPECIAL.pad, SPECIAL.eos, SPECIAL.bos, SPECIAL.cls) == (0, 1, 32100, 32101)
    assert set(SPECIAL.ignored_targets) == {0, 32100, 32101}


@pytest.mark.parametrize("num_words", [0, 1, 30, 60, 61, 62, 200])
def test_layout_shape_and_round_trip(num_words):
    words = list(range(3, 3 + num_words))
    ids, truncated = build_layout(words, SPECIAL)
    assert len(ids) == SEQ_LEN
    assert check_layout(ids, SPECIAL) is None
    assert ids[0] == SPECIAL.bos and ids[CLS_INDEX] == SPECIAL.cls and ids[-1] == SPECIAL.pad
    assert truncated == (num_words > 61)
    assert caption_word_ids(ids, SPECIAL) == words[:61]


def test_check_layout_names_the_fault():
    ids, _ = build_layout([5, 6], SPECIAL)
    broken = list(ids)
    broken[CLS_INDEX] = SPECIAL.pad
    assert "CLS" in check_layout(broken, SPECIAL)
    assert "ids" in check_layout(ids[:-1], SPECIAL)
    no_eos = [t if t != SPECIAL.eos else 7 for t in ids]
    assert "EOS" in check_layout(no_eos, SPECIAL)


def _write_shard(path, count=3):
    with ShardWriter(path) as writer:
        for i in range(count):
            ids, _ = build_layout([5] * i, SPECIAL)
            writer.write(f"k{i:03d}", sample_members(b"\xff\xd8" + bytes(700 + i), f"caption {i}", ids, {"i": i}))


def test_shard_round_trip_and_index_offsets(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    _write_shard(shard)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.crc", "shard-000000.idx", "shard-000000.tar"]
    samples = list(iter_tar_samples(shard))
    assert [k for k, _ in samples] == ["k000", "k001", "k002"]
    raw = shard.read_bytes()
    for (key, members), entry in zip(samples, read_index(index_path(shard)).entries(), strict=True):
        for ext, (offset, size) in entry.items():
            assert raw[offset : offset + size] == members[ext]
        assert decode_ids(members["ids"]).tolist()[: 1 + int(key[-1])] == [SPECIAL.bos] + [5] * int(key[-1])


WDS2IDX = shutil.which("wds2idx", path=str(Path(sys.executable).parent))


@pytest.mark.dali  # wds2idx comes with DALI: skipped without it, failed where DALI was asked for (conftest)
def test_index_equals_dalis_own(tmp_path):
    assert WDS2IDX is not None, f"DALI imports but its wds2idx is not in {Path(sys.executable).parent}"
    shard = tmp_path / "a.tar"
    _write_shard(shard, count=5)
    subprocess.run([WDS2IDX, str(shard), str(tmp_path / "dali.idx")], check=True, capture_output=True)
    assert (tmp_path / "dali.idx").read_text() == index_path(shard).read_text()


def test_failed_write_publishes_nothing(tmp_path):
    shard = tmp_path / "b.tar"
    with pytest.raises(RuntimeError), ShardWriter(shard) as writer:
        writer.write("k0", {"txt": b"x"})
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_bad_keys_and_ids_are_refused(tmp_path):
    with ShardWriter(tmp_path / "c.tar") as writer, pytest.raises(ValueError, match="no dots"):
        writer.write("a.b", {"txt": b"x"})
    with pytest.raises(ValueError, match="shape"):
        sample_members(b"", "x", np.zeros(64), {})
    with pytest.raises(ValueError, match="bytes"):
        decode_ids(b"\0" * 10)


def test_damaged_tar_error_names_the_file(tmp_path):
    shard = tmp_path / "d.tar"
    _write_shard(shard, count=4)
    whole = shard.read_bytes()
    boundary = min(offset for offset, _ in read_index(index_path(shard)).entries()[2].values()) - tarfile.BLOCKSIZE
    # inside a header, inside a member, inside the ids record, exactly between two samples
    for cut in (2000, 2100, 3300, boundary):
        shard.write_bytes(whole[:cut])
        with pytest.raises(tarfile.ReadError, match="d.tar"):
            list(iter_tar_samples(shard))


@pytest.mark.parametrize("special_id", [SPECIAL.pad, SPECIAL.eos, SPECIAL.bos, SPECIAL.cls])
def test_layout_refuses_a_special_id_among_the_words(special_id):
    with pytest.raises(ValueError, match="special_token_in_caption"):
        build_layout([5, special_id, 6], SPECIAL)


def test_index_parser_reads_uneven_samples_like_even_ones(tmp_path):
    """The one index parser has a column fast path and a per-line path; both give one table."""
    even, uneven = tmp_path / "even.tar", tmp_path / "uneven.tar"
    _write_shard(even, count=3)
    with ShardWriter(uneven) as writer:
        writer.write("a", {"jpg": b"\xff\xd8", "ids": bytes(520)})
        writer.write("b", {"ids": bytes(520), "txt": b"x"})
    table = read_index(index_path(even))
    assert table.exts == ("jpg", "txt", "ids", "json") and table.keys == ["k000", "k001", "k002"]
    assert table.tar_size() == even.stat().st_size
    odd = read_index(index_path(uneven))
    assert odd.exts == ("jpg", "ids", "txt") and odd.keys == ["a", "b"]
    assert odd.offsets[1, 0] == -1 and odd.entries()[1].keys() == {"ids", "txt"}
    assert odd.tar_size() == uneven.stat().st_size
    index_path(uneven).write_text("v1.2 3\njpg 0 10 a.jpg\n")
    with pytest.raises(ValueError, match="uneven.idx.*says 3 samples"):
        read_index(index_path(uneven))


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    from grr_data.infra import files

    target = tmp_path / "state.json"
    files.write_json_atomic(target, {"v": 1})
    real_replace = os.replace

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        files.write_json_atomic(target, {"v": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(target.read_text()) == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    # a finished folder replaces an older one whole
    old, new = tmp_path / "ckpt", tmp_path / ".ckpt.tmp"
    old.mkdir(), new.mkdir()
    (old / "a").write_text("old"), (new / "b").write_text("new")
    files.publish(new, old)
    assert [p.name for p in old.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "state.json"]
