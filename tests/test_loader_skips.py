"""The loaders' skip reasons not covered by tests/test_faults_data.py (issue 21): a shard cut short
(`truncated_shard`), an ids record that does not decode (`bad_ids`), ids whose fixed positions are
wrong (`bad_layout`), each skipped, counted under its reason and named, by both loaders; and a rank
none of whose samples can be used fails naming the set, while the other rank reads on."""

import logging
import os
from pathlib import Path

import pytest
from shardset import make_shardset

from grr_data.format.layout import CLS_INDEX
from grr_data.format.records import (
    ShardWriter,
    decode_ids,
    encode_ids,
    index_path,
    iter_tar_samples,
    read_index,
)
from grr_data.loader import make_loader

KINDS = ["cpu", pytest.param("dali", marks=pytest.mark.dali)]  # tests/conftest.py: skipped or failed without DALI
SHARD = "train/shard-000000.tar"


def read_epoch(root: Path, kind: str, **kw):
    """One epoch in plan order: (the loader, the keys of the slots holding their own sample)."""
    loader = make_loader(root, "train", batch_size=4, kind=kind, shuffle=False, num_workers=0, with_keys=True, **kw)
    keys = [k for b in loader for k, real in zip(b["keys"], b["real"].tolist(), strict=True) if real]
    return loader, keys


def rewrite_sample(root: Path, local: int, change) -> str:
    """Rewrite shard 0 with sample `local`'s members changed by `change(members)`, through the
    shard writer (so its checksums are those of the changed bytes: a set written that way)."""
    tar = root / SHARD
    samples = list(iter_tar_samples(tar))
    change(samples[local][1])
    with ShardWriter(tar) as writer:
        for key, members in samples:
            writer.write(key, members)
    return samples[local][0]


def short_ids(members) -> None:
    members["ids"] = members["ids"][:-4]  # 516 bytes: not a whole 65-id record


def no_bos(members) -> None:
    ids = decode_ids(members["ids"])
    ids[0] = 12  # an ordinary word where BOS stands
    members["ids"] = encode_ids(ids)


def cls_moved(members) -> None:
    ids = decode_ids(members["ids"])
    ids[CLS_INDEX], ids[CLS_INDEX - 1] = ids[CLS_INDEX - 1], ids[CLS_INDEX]
    members["ids"] = encode_ids(ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("change, reason, logged", [
    (short_ids, "bad_ids", "an .ids record holds 516 bytes, expected 520"),
    (no_bos, "bad_layout", "token ids [12, "),
    (cls_moved, "bad_layout", f"at positions 0, {CLS_INDEX}, -1; the layout puts BOS"),
], ids=["bad_ids", "bad_layout-bos", "bad_layout-cls"])
def test_a_sample_with_bad_ids_is_skipped_counted_and_named(tmp_path, kind, change, reason, logged, caplog):
    root = make_shardset(tmp_path, (6, 6))
    key = rewrite_sample(root, 2, change)
    with caplog.at_level(logging.WARNING, logger="grr.loader"):
        loader, keys = read_epoch(root, kind)
    assert loader.skipped == {reason: 1}
    assert key not in keys and len(keys) == 11
    assert f"shard-000000.tar {key} ({reason}" in caplog.text and logged in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_a_shard_cut_short_skips_the_samples_past_its_end(tmp_path, kind, caplog):
    root = make_shardset(tmp_path, (6, 6))
    tar = root / SHARD
    table = read_index(index_path(tar))
    last = len(table) - 1
    col = table.column("jpg")
    cut = int(table.offsets[last, col]) + int(table.sizes[last, col]) // 2  # inside the last sample's JPEG
    os.truncate(tar, cut)  # what a copy that stopped part way leaves
    with caplog.at_level(logging.WARNING, logger="grr.loader"):
        loader, keys = read_epoch(root, kind)
    assert loader.skipped == {"truncated_shard": 1}
    assert table.keys[last] not in keys and len(keys) == 11
    assert f"shard-000000.tar {table.keys[last]} (truncated_shard" in caplog.text
    assert "cut short (" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_a_rank_with_no_usable_sample_fails_naming_the_set_and_the_other_reads_on(tmp_path, kind):
    good = make_shardset(tmp_path / "good", (8,))
    opts = dict(batch_size=2, kind=kind, shuffle=False, world_size=2)
    plan = make_loader(good, "train", rank=1, num_workers=0, **opts).plan.rank_batches(0)
    rank1 = {int(g) for g in plan.reshape(-1)}
    assert 0 < len(rank1) < 8  # rank 0 holds the others
    jpegs = [members["jpg"] for _, members in iter_tar_samples(good / SHARD)]
    broken = make_shardset(tmp_path / "broken", (8,), images=[b"not a jpeg" if g in rank1 else jpegs[g]
                                                               for g in range(8)])
    with pytest.raises(RuntimeError, match=rf"^{broken}: no sample of this rank's plan can be decoded$"):
        list(make_loader(broken, "train", rank=1, num_workers=0, **opts))
    rank0 = make_loader(broken, "train", rank=0, num_workers=0, **opts)
    batches = list(rank0)
    assert rank0.skipped == {} and all(bool(b["real"].all()) for b in batches)
