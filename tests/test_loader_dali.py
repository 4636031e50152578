"""The DALI loader on its CPU path (device_id=None) against the CPU loader on the same shards."""

import gc
import logging
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from shardset import jpeg_bytes, make_shardset, sample_number

from grr_data.loader import make_loader
from grr_data.loader.base import STD
from grr_data.loader.reader import BatchReader, thread_stacks

# Without DALI these skip, or fail where the install asked for it (GRR_DALI=cu12|cu13): tests/conftest.py.
pytestmark = pytest.mark.dali

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


_STUCK: set = set()  # reader threads a test already failed on, with their stacks: not counted again


def reader_threads():
    return [t for t in threading.enumerate() if t.name == "grr-dali-reader" and t not in _STUCK]


def _reader_stacks() -> dict:
    live = {t.ident for t in reader_threads()}
    return {i: s for i, s in thread_stacks("grr-dali-reader").items() if i in live}


def no_reader():
    """True when no reader thread is alive; else the test fails at once with each live reader's
    stack (where it is stuck: a read, the garbage collector running a finalizer on it, ...)."""
    stacks = _reader_stacks()
    if stacks:
        pytest.fail("grr-dali-reader still alive:\n" + "\n".join(f"thread {i}:\n{s}" for i, s in stacks.items()))
    return True


@pytest.fixture(autouse=True)
def no_reader_left_behind():
    """A reader left alive by a test fails that test (with its stack) and is stopped here; one that
    will not stop is reported once and not counted again, so it cannot fail every later test."""
    yield
    stacks = _reader_stacks()
    if stacks:
        for r in [o for o in gc.get_objects() if isinstance(o, BatchReader)]:
            r.close()
        for t in reader_threads():  # readers already dropped were told to stop; let them end
            t.join(timeout=35)
        _STUCK.update(reader_threads())
        pytest.fail("this test left grr-dali-reader threads alive:\n" + "\n".join(
            f"thread {i}:\n{s}" for i, s in stacks.items()))


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
    assert loader.batches_done == 0 and loader.epoch == 1 and no_reader()


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
    assert loader.fallback_batches == 0 and no_reader()


def test_dali_a_failed_pipeline_is_released_at_once_not_by_the_collector(photos, monkeypatch):
    """After a source error the failed pipeline must go when the error and loader go, on this thread:
    left in a reference cycle (the error's traceback holding the feed that holds the error), it was
    shut down by the cyclic collector, on whichever thread that ran, a reader thread included."""
    loader = make_loader(photos, kind="dali", batch_size=4)
    pipes, pipeline, payload = [], loader._pipeline, loader._payload

    def kept(source):
        pipe = pipeline(source)
        pipes.append(weakref.ref(pipe))
        return pipe

    def failing(batches, b):
        if b == 2:
            raise OSError("disk went away")
        return payload(batches, b)

    monkeypatch.setattr(loader, "_pipeline", kept)
    monkeypatch.setattr(loader, "_payload", failing)
    gc.collect()
    gc.disable()
    try:
        try:
            list(loader)
        except OSError as err:
            assert "disk went away" in str(err)
        monkeypatch.undo()
        del loader
        assert len(pipes) == 1 and pipes[0]() is None, "the failed pipeline waits for the garbage collector"
    finally:
        gc.enable()


def test_dali_prefetch_deeper_than_the_epoch_and_no_thread_leaks(photos):
    reference = [b["ids"] for b in make_loader(photos, kind="dali", batch_size=4, seed=2)]
    loader = make_loader(photos, kind="dali", batch_size=4, seed=2, prefetch=17)
    assert loader.prefetch == 17
    for _ in range(2):  # epoch 0 twice: the same pipeline, a new reader each time
        loader.set_epoch(0)
        got = [b["ids"] for b in loader]
        assert len(got) == len(reference) and all(
            torch.equal(a, b) for a, b in zip(got, reference, strict=True)
        )
        assert no_reader()
    # 7 batches, 2 ahead in DALI and 2 in the reader's queue: the reader is still at work.
    it = iter(make_loader(photos, kind="dali", batch_size=4, seed=2, prefetch=2))
    next(it)
    assert len(reader_threads()) == 1
    it.close()  # an epoch abandoned part way (max_steps) stops its reader
    assert no_reader()
    with pytest.raises(ValueError, match="prefetch"):
        make_loader(photos, kind="dali", prefetch=0)


def count_builds(loader, monkeypatch):
    """How many DALI pipelines the loader builds from now on (a list holding one 1 per build)."""
    builds, pipeline = [], loader._pipeline

    def counted(source):
        builds.append(1)
        return pipeline(source)

    monkeypatch.setattr(loader, "_pipeline", counted)
    return builds


def cpu_epochs(photos, epochs, **opts):
    cpu = make_loader(photos, kind="cpu", num_workers=0, draft=False, **opts)
    return [list(cpu) for _ in range(epochs)]


def same(dali, cpu):
    assert [b["keys"] for b in dali] == [b["keys"] for b in cpu]
    assert [b["real"].tolist() for b in dali] == [b["real"].tolist() for b in cpu]
    assert all(torch.equal(d["ids"].cpu(), c["ids"]) for d, c in zip(dali, cpu, strict=True))


@pytest.mark.parametrize("prefetch", [2, 17])  # 17: DALI asks past every epoch's end (7 batches)
def test_dali_one_pipeline_for_many_epochs(photos, monkeypatch, prefetch):
    opts = dict(batch_size=4, seed=6, with_keys=True)
    cpu = cpu_epochs(photos, 3, **opts)
    assert cpu[0][0]["keys"] != cpu[1][0]["keys"]  # the epochs really differ (a new permutation each)
    loader = make_loader(photos, kind="dali", prefetch=prefetch, **opts)
    builds = count_builds(loader, monkeypatch)
    for e in range(3):
        got = list(loader)
        same(got, cpu[e])
        assert all(
            levels(c["images"], d["images"]).max() <= MAX_LEVELS for c, d in zip(cpu[e], got, strict=True)
        )
        assert loader.epoch == e + 1 and no_reader()
    assert len(builds) == 1


def test_dali_abandoned_epoch_stops_its_reader_and_the_next_is_exact(photos, monkeypatch):
    opts = dict(batch_size=2, seed=7, with_keys=True)
    cpu = cpu_epochs(photos, 3, **opts)
    loader = make_loader(photos, kind="dali", prefetch=2, **opts)
    builds = count_builds(loader, monkeypatch)
    it = iter(loader)
    head = [next(it), next(it)]
    assert len(reader_threads()) == 1  # 13 batches, ~4 ahead in DALI and 2 read: still at work
    it.close()  # an epoch abandoned part way (max_steps, an exception in the step)
    assert no_reader()  # stopped and joined by close itself, no waiting
    assert (loader.epoch, loader.batches_done) == (0, 2)
    # The same epoch goes on from where it stopped, on the same pipeline: DALI's prefetched
    # batches of the abandoned feed are dropped, not handed out.
    same(head + list(loader), cpu[0])
    # Abandoned by dropping the iterator (garbage collection), then a new epoch from its start.
    it = iter(loader)
    next(it)
    del it
    assert no_reader()
    loader.set_epoch(2)
    same(list(loader), cpu[2])
    assert len(builds) == 1 and no_reader()
    # DALI has asked for the whole epoch (and past its end) before the first batch is taken.
    deep = make_loader(photos, kind="dali", prefetch=17, **opts)
    it = iter(deep)
    next(it)
    it.close()
    assert no_reader()
    deep.set_epoch(1)
    same(list(deep), cpu[1])


def test_dali_resume_mid_epoch_then_the_next_epoch(photos, monkeypatch):
    opts = dict(batch_size=3, seed=8, with_keys=True)
    cpu = cpu_epochs(photos, 2, **opts)
    first = make_loader(photos, kind="dali", **opts)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    it.close()
    resumed = make_loader(photos, kind="dali", **opts)
    builds = count_builds(resumed, monkeypatch)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    same(head + rest, cpu[0])
    same(list(resumed), cpu[1])
    assert len(builds) == 1 and resumed.epoch == 2


def test_dali_an_earlier_open_iteration_is_superseded(photos):
    loader = make_loader(photos, kind="dali", batch_size=4, seed=2)
    old = iter(loader)
    next(old)
    new = iter(loader)
    next(new)  # the new iteration takes the pipeline; the old one's reader is stopped
    assert len(reader_threads()) == 1
    with pytest.raises(RuntimeError, match="iterated again while an earlier iteration"):
        next(old)
    new.close()
    assert no_reader()


def test_dali_failure_in_a_later_epoch_falls_back_and_rebuilds_once(photos, monkeypatch, caplog):
    opts = dict(batch_size=4, seed=9, with_keys=True)
    cpu = cpu_epochs(photos, 3, **opts)
    loader = make_loader(photos, kind="dali", prefetch=3, **opts)
    builds = count_builds(loader, monkeypatch)
    same(list(loader), cpu[0])
    payload = loader._payload

    def corrupt_in_epoch_1(batches, b):
        (jpegs, ids, nums), events = payload(batches, b)
        if loader.epoch == 1 and b == 1:
            jpegs = [np.frombuffer(b"not a jpeg", dtype=np.uint8) for _ in jpegs]
        return (jpegs, ids, nums), events

    monkeypatch.setattr(loader, "_payload", corrupt_in_epoch_1)
    with caplog.at_level(logging.WARNING, logger="grr.loader"):
        got = list(loader)
    same(got, cpu[1])
    assert loader.fallback_batches == 1 and "decoded it with Pillow" in caplog.text
    assert torch.equal(got[1]["images"], cpu[1][1]["images"])  # Pillow's full decode, as the CPU loader
    same(list(loader), cpu[2])
    assert len(builds) == 2 and no_reader()  # the first, and one after the failure


def test_dali_close_releases_the_pipeline(photos, monkeypatch):
    loader = make_loader(photos, kind="dali", batch_size=4, seed=2)
    builds = count_builds(loader, monkeypatch)
    reference = [b["ids"] for b in loader]
    pipe = weakref.ref(loader._pipe)
    loader.close()
    gc.collect()
    assert pipe() is None and no_reader()
    loader.set_epoch(0)
    assert all(torch.equal(a["ids"], r) for a, r in zip(loader, reference, strict=True))  # a new pipeline
    assert len(builds) == 2
    other = make_loader(photos, kind="dali", batch_size=4, seed=2)  # not monkeypatched: nothing else holds it
    it = iter(other)
    next(it)
    pipe = weakref.ref(other._pipe)
    del it, other  # the loader itself collected: its pipeline goes with it, no reader left
    assert pipe() is None and no_reader()


@pytest.mark.gpu
def test_dali_gpu_epochs_exact_and_an_abandoned_epoch_leaves_no_reader(photos, monkeypatch):
    """The GPU path (nvJPEG, ids on the GPU) over epochs, an abandoned one and a resume point."""
    opts = dict(batch_size=2, seed=11, with_keys=True)
    cpu = cpu_epochs(photos, 3, **opts)
    loader = make_loader(photos, kind="dali", device="cuda", prefetch=2, **opts)
    builds = count_builds(loader, monkeypatch)
    same(list(loader), cpu[0])
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    assert len(reader_threads()) == 1
    it.close()
    assert no_reader()
    same(head + list(loader), cpu[1])
    same(list(loader), cpu[2])
    assert head[0]["images"].device.type == "cuda" and len(builds) == 1
    loader.close()
    assert no_reader()


@pytest.mark.gpu
def test_dali_gpu_epoch_boundary_costs_no_pipeline_build(photos, monkeypatch):
    """On a GPU a pipeline build (nvJPEG) costs seconds; an epoch boundary must cost about a batch.
    A behaviour check, not a benchmark: the boundary (last batch of one epoch to the first of the
    next) must take less than 10 median batch intervals, or 0.25 s if that is more."""
    loader = make_loader(photos, kind="dali", batch_size=4, seed=2, device="cuda", prefetch=2)
    builds = count_builds(loader, monkeypatch)
    list(loader)  # the build, and warm-up
    stamps, boundaries = [], []
    for _ in range(3):
        for _batch in loader:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        boundaries.append(len(stamps))  # index of the next epoch's first batch
    gaps = np.diff(stamps)
    cross = [gaps[i - 1] for i in boundaries[:-1]]
    inside = np.delete(gaps, [i - 1 for i in boundaries[:-1]])
    limit = max(10 * float(np.median(inside)), 0.25)
    assert max(cross) < limit, (
        f"epoch boundaries took {cross} s; batches inside an epoch {np.median(inside)} s"
    )
    assert len(builds) == 1 and no_reader()
