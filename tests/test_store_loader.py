"""The loaders on a set in an S3-compatible store (issue 23), against moto in server mode behind a
fault proxy (tests/s3_server.py): the same batches as from the same set on disk (CPU loader with
and without workers, DALI's CPU path), each sample fetched once per epoch, and the faults: a
connection dropped mid-epoch (retried, then a clear error after the budget; nothing skipped),
throttling and slow responses (slower, not failed), a shard deleted or replaced after the
manifest (counted as for a local set)."""

import re
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import new_bucket, upload  # noqa: E402
from shardset import make_shardset  # noqa: E402

from grr_data.format.records import read_index  # noqa: E402
from grr_data.infra.store import StoreUnavailable  # noqa: E402
from grr_data.loader import make_loader  # noqa: E402

SIZES = (10, 10, 5)  # 25 samples in 3 shards


@pytest.fixture(scope="module")
def local_set(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("set"), SIZES)


@pytest.fixture
def stored(env, local_set):
    """The same set, in a bucket of the test's own."""
    return upload(env, local_set, f"s3://{new_bucket(env)}/sets/photos")


def batches(loader) -> list[dict]:
    return [dict(b) for b in loader]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["ids"], y["ids"])
        assert torch.equal(x["real"], y["real"]) and x.get("keys") == y.get("keys")


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # workers: ~8 s
def test_cpu_loader_from_the_store_gives_the_local_batches(stored, local_set, workers):
    kw = dict(batch_size=4, kind="cpu", num_workers=workers, seed=3, with_keys=True)
    remote, local = make_loader(stored, **kw), make_loader(local_set, **kw)
    for epoch in (0, 1):
        remote.set_epoch(epoch), local.set_epoch(epoch)
        assert_same(batches(remote), batches(local))
    assert remote.skipped == {} and remote.shards.read_ahead > 0 and local.shards.read_ahead == 0


def test_each_sample_is_fetched_once_per_epoch(env, stored, local_set):
    loader = make_loader(stored, batch_size=4, kind="cpu", num_workers=0, seed=5)
    start = len(env.proxy.log)
    order = loader.plan.rank_batches(0).reshape(-1).tolist()  # 28 slots: 25 samples, 3 repeats
    list(loader)
    gets = [(path, rng) for method, path, rng in env.proxy.log[start:] if method == "GET" and path.endswith(".tar")]
    spans = []
    for path, rng in gets:
        first, last = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", rng).groups())
        spans.append((path.rsplit("/", 1)[1], first, last))
    for g in range(25):
        shard, local = (0, g) if g < 10 else (1, g - 10) if g < 20 else (2, g - 20)
        offset = read_index(local_set / f"train/shard-{shard:06d}.idx").offsets[local, 0]  # its .jpg
        fetched = sum(name == f"shard-{shard:06d}.tar" and a <= offset <= b for name, a, b in spans)
        # read once; a padding repeat in the same batch is served by the same request
        assert 1 <= fetched <= order.count(g), (g, fetched)
        if order.count(g) == 1:
            assert fetched == 1, g


@pytest.mark.slow
def test_dali_cpu_path_from_the_store_gives_the_local_batches(stored, local_set):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    kw = dict(batch_size=4, kind="dali", num_workers=2, seed=3, device="cpu")
    remote, local = make_loader(stored, **kw), make_loader(local_set, **kw)
    try:
        assert_same(batches(remote), batches(local))
        assert remote.skipped == {}
    finally:
        remote.close(), local.close()


def test_resume_mid_epoch_from_the_store_is_exact(stored, local_set):
    kw = dict(batch_size=4, kind="cpu", num_workers=0, seed=7)
    reference = batches(make_loader(local_set, **kw))
    loader = make_loader(stored, **kw)
    it = iter(loader)
    next(it), next(it), next(it)
    state = loader.state_dict()
    it.close()
    resumed = make_loader(stored, **kw)
    resumed.load_state_dict(state)
    assert_same(batches(resumed), reference[3:])


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # workers: ~8 s
def test_a_connection_dropped_mid_epoch_is_retried_and_the_epoch_goes_on(env, stored, local_set, workers):
    reference = batches(make_loader(local_set, batch_size=4, kind="cpu", num_workers=workers))
    loader = make_loader(stored, batch_size=4, kind="cpu", num_workers=workers)
    got = []
    for batch in loader:
        got.append(dict(batch))
        if len(got) == 1:  # down now, back in 1.5 s: within the budget (20 s)
            env.proxy.down()
            threading.Timer(1.5, env.proxy.up).start()
    assert_same(got, reference)
    assert loader.skipped == {}  # nothing skipped: the reads waited for the store


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # workers: ~8 s
def test_a_store_down_past_the_budget_is_a_clear_error_not_skips(env, stored, monkeypatch, workers):
    monkeypatch.setenv("GRR_STORE_RETRY_S", "2")
    loader = make_loader(stored, batch_size=4, kind="cpu", num_workers=workers)
    if workers:  # workers prefetch this small set's every batch at once (a CI run saw it): down before they start
        env.proxy.down()
        it = iter(loader)
    else:  # a first batch read, then the store goes down mid-epoch
        it = iter(loader)
        next(it)
        env.proxy.down()
    with pytest.raises(StoreUnavailable) as caught:
        for _ in it:
            pass
    message = str(caught.value)
    assert message.startswith(f"{stored}/train/shard-") and f"the store at {env.proxy.url}" in message
    assert "did not answer for 2 s" in message and "\n" not in message
    assert loader.skipped == {}


def test_throttling_and_slow_responses_are_slower_not_failed(env, stored, local_set):
    reference = batches(make_loader(local_set, batch_size=4, kind="cpu", num_workers=0))
    loader = make_loader(stored, batch_size=4, kind="cpu", num_workers=0)
    throttled = env.proxy.throttled
    env.proxy.slowdown(12)  # the next 12 requests answered 503 SlowDown
    env.proxy.delay_s = 0.05
    assert_same(batches(loader), reference)
    assert env.proxy.throttled - throttled == 12 and loader.skipped == {}


def test_a_shard_deleted_before_the_loader_opens_is_named(env, stored):
    bucket, prefix = stored.removeprefix("s3://").split("/", 1)
    env.client.delete_object(Bucket=bucket, Key=f"{prefix}/train/shard-000001.tar")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{stored}/train/shard-000001.tar or its index")):
        make_loader(stored, batch_size=4, kind="cpu", num_workers=0)


def test_shards_deleted_or_replaced_after_the_manifest_are_counted_as_locally(env, stored, local_set, tmp_path):
    import shutil

    local = Path(shutil.copytree(local_set, tmp_path / "copy"))
    kw = dict(batch_size=4, kind="cpu", num_workers=0, shuffle=False)
    remote_loader, local_loader = make_loader(stored, **kw), make_loader(local, **kw)
    # after the loaders opened the set: shard 1 deleted, shard 2 replaced by a copy with one
    # image byte changed (same size, so only its CRC32 tells)
    bucket, prefix = stored.removeprefix("s3://").split("/", 1)
    env.client.delete_object(Bucket=bucket, Key=f"{prefix}/train/shard-000001.tar")
    (local / "train/shard-000001.tar").unlink()
    tar2 = bytearray((local / "train/shard-000002.tar").read_bytes())
    offset = int(read_index(local / "train/shard-000002.idx").offsets[2, 0]) + 700  # sample 22's JPEG
    tar2[offset] ^= 0x55
    env.client.put_object(Bucket=bucket, Key=f"{prefix}/train/shard-000002.tar", Body=bytes(tar2))
    (local / "train/shard-000002.tar").write_bytes(bytes(tar2))
    remote, got_local = batches(remote_loader), batches(local_loader)
    assert local_loader.skipped == {"read_error": 10, "checksum_mismatch": 1}
    assert remote_loader.skipped == local_loader.skipped
    assert_same(remote, got_local)
