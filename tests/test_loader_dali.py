"""The DALI loader on its CPU path (device_id=None) against the CPU loader on the same shards."""

import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from shardset import jpeg_bytes, make_shardset, sample_number

from grr_data.loader import make_loader
from grr_data.loader.base import STD

pytest.importorskip(
    "nvidia.dali", reason="nvidia.dali does not import here (pip install nvidia-dali-cuda120)"
)

# Measured on the test photos: max 3 levels (of 255) on a handful of pixels, mean ~0.001 levels.
# Both decode with libjpeg-turbo and resize with an antialiased bilinear (triangle) filter.
MAX_LEVELS, MEAN_LEVELS = 4.0, 0.05


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("photos"), (10, 10, 5))


def levels(a, b):
    return ((a.float() - b.float()) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs()


@pytest.mark.parametrize("rank", [0, 1])
def test_dali_matches_cpu_loader(photos, rank):
    opts = dict(batch_size=4, rank=rank, world_size=2, seed=3, with_keys=True)
    cpu = list(make_loader(photos, kind="cpu", num_workers=0, **opts))
    dali_loader = make_loader(photos, kind="dali", **opts)
    assert dali_loader.name == "dali" and len(dali_loader) == len(cpu) == 4
    dali = list(dali_loader)
    assert len(dali) == len(cpu)
    for c, d in zip(cpu, dali, strict=True):
        assert d["images"].shape == (4, 3, 288, 288) and d["images"].dtype == torch.float32
        assert d["ids"].dtype == torch.int64 and torch.equal(c["ids"], d["ids"])
        assert c["keys"] == d["keys"]
        diff = levels(c["images"], d["images"])
        assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS


def test_dali_half_precision(photos):
    batch = next(iter(make_loader(photos, kind="dali", batch_size=2, dtype=torch.float16)))
    assert batch["images"].dtype == torch.float16
    batch = next(iter(make_loader(photos, kind="dali", batch_size=2, dtype=torch.bfloat16)))
    assert batch["images"].dtype == torch.bfloat16


def test_dali_resume(photos):
    reference = list(make_loader(photos, kind="dali", batch_size=3, seed=4))
    first = make_loader(photos, kind="dali", batch_size=3, seed=4)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    resumed = make_loader(photos, kind="dali", batch_size=3, seed=4)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert len(head) + len(rest) == len(reference) == 9
    for got, ref in zip(head + rest, reference, strict=True):
        assert torch.equal(got["ids"], ref["ids"])


def test_dali_skips_bad_samples_like_the_cpu_loader(tmp_path):
    good = [jpeg_bytes(Image.new("RGB", (320, 288), (10 * i, 50, 0))) for i in range(12)]
    images = list(good)
    images[1] = b"definitely not a jpeg"
    images[6] = good[6][: len(good[6]) // 2]
    images[8] = images[9] = images[10] = images[11] = b"broken"
    root = make_shardset(tmp_path, (6, 6), images=images)
    cpu_loader = make_loader(root, batch_size=4, kind="cpu", shuffle=False, num_workers=0)
    dali_loader = make_loader(root, batch_size=4, kind="dali", shuffle=False)
    cpu, dali = list(cpu_loader), list(dali_loader)
    order = [[sample_number(r) for r in b["ids"]] for b in dali]
    assert order == [[0, 2, 2, 3], [4, 5, 7, 7], [0, 0, 0, 0]]
    assert [[sample_number(r) for r in b["ids"]] for b in cpu] == order
    assert dali_loader.skipped == cpu_loader.skipped == {"decode_error": 6}
    # substitutes are not real: the split's usable samples are each counted once
    real = [[True, False, True, True], [True, True, False, True], [False] * 4]
    assert [b["real"].tolist() for b in dali] == [b["real"].tolist() for b in cpu] == real
    assert all(levels(c["images"], d["images"]).max() <= MAX_LEVELS for c, d in zip(cpu, dali, strict=True))


def reader_threads():
    return [t for t in threading.enumerate() if t.name == "grr-dali-reader"]


def corrupt_batch(loader, monkeypatch, bad_batch, replacement=b"not a jpeg"):
    """DALI gets garbage for one batch while Pillow (which reads the shards itself) sees good JPEGs."""
    payload = loader._payload

    def fake(batches, b):
        (jpegs, ids, nums), events = payload(batches, b)
        if b == bad_batch:
            jpegs = [np.frombuffer(replacement, dtype=np.uint8) for _ in jpegs]
        return (jpegs, ids, nums), events

    monkeypatch.setattr(loader, "_payload", fake)


def test_dali_rejecting_a_good_batch_falls_back_to_pillow(photos, monkeypatch, caplog):
    opts = dict(batch_size=4, seed=5, with_keys=True)
    cpu = list(make_loader(photos, kind="cpu", num_workers=0, draft=False, **opts))
    loader = make_loader(photos, kind="dali", prefetch=3, **opts)
    corrupt_batch(loader, monkeypatch, bad_batch=1)
    with caplog.at_level(logging.WARNING, logger="grr.loader"):
        dali = list(loader)
    assert loader.fallback_batches == 1 and loader.skipped == {}
    assert "decoded it with Pillow" in caplog.text
    assert [b["keys"] for b in dali] == [b["keys"] for b in cpu]
    assert [b["real"].tolist() for b in dali] == [b["real"].tolist() for b in cpu]
    for c, d in zip(cpu, dali, strict=True):
        assert torch.equal(c["ids"], d["ids"]) and d["images"].dtype == torch.float32
        assert levels(c["images"], d["images"]).max() <= MAX_LEVELS
    # The fallback batch is exactly what the CPU loader (Pillow, full decode) gives.
    assert torch.equal(dali[1]["images"], cpu[1]["images"])
    assert loader.batches_done == 0 and loader.epoch == 1 and not reader_threads()


def test_dali_source_errors_are_raised_not_decoded_around(photos, monkeypatch):
    loader = make_loader(photos, kind="dali", batch_size=4)
    payload = loader._payload

    def failing(batches, b):
        if b == 2:
            raise OSError("disk went away")
        return payload(batches, b)

    monkeypatch.setattr(loader, "_payload", failing)
    with pytest.raises(OSError, match="disk went away"):
        list(loader)
    assert loader.fallback_batches == 0 and not reader_threads()


def test_dali_prefetch_deeper_than_the_epoch_and_no_thread_leaks(photos):
    reference = [b["ids"] for b in make_loader(photos, kind="dali", batch_size=4, seed=2)]
    loader = make_loader(photos, kind="dali", batch_size=4, seed=2, prefetch=17)
    assert loader.prefetch == 17
    for _ in range(2):  # two epochs, the second from a fresh pipeline and reader
        loader.set_epoch(0)
        got = [b["ids"] for b in loader]
        assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))
        assert not reader_threads()
    # 7 batches, 2 ahead in DALI and 2 in the reader's queue: the reader is still at work.
    it = iter(make_loader(photos, kind="dali", batch_size=4, seed=2, prefetch=2))
    next(it)
    assert len(reader_threads()) == 1
    it.close()  # an epoch abandoned part way (max_steps) stops its reader
    assert not reader_threads()
    with pytest.raises(ValueError, match="prefetch"):
        make_loader(photos, kind="dali", prefetch=0)
