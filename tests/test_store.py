"""Sets in an S3-compatible store (issue 23), against a real server on localhost (moto in server
mode, behind a proxy that injects faults: tests/s3_server.py): the store layer's reads and writes,
`grr data shard --out s3://...` (byte-identical to a local run, manifest last, resumable, locked),
`grr data check s3://...` (the same report), and a store that cannot be reached at start."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import free_port, new_bucket, objects, upload  # noqa: E402
from shardset import make_shardset  # noqa: E402
from test_shard import make_fetch_output  # noqa: E402  (sets HF_HUB_OFFLINE=1)

from grr_cli.main import app  # noqa: E402
from grr_data.check import check_dataset  # noqa: E402
from grr_data.format.manifest import Manifest  # noqa: E402
from grr_data.infra import store  # noqa: E402
from grr_data.infra.lock import LockedError  # noqa: E402
from grr_data.infra.store import StorePath, StoreUnavailable, location  # noqa: E402
from grr_data.shard.run import shard_dataset  # noqa: E402


def test_store_path_names():
    p = StorePath("s3://bkt//sets/x/")
    assert str(p) == "s3://bkt/sets/x" and p.key == "bkt/sets/x" and p.scheme == "s3"
    tar = p / "train" / "shard-000001.tar"
    assert str(tar) == "s3://bkt/sets/x/train/shard-000001.tar"
    assert (tar.name, tar.suffix, tar.stem) == ("shard-000001.tar", ".tar", "shard-000001")
    assert str(tar.with_suffix(".idx")) == "s3://bkt/sets/x/train/shard-000001.idx"
    assert tar.parent.parent == p and tar.relative_to(p) == "train/shard-000001.tar"
    assert location("s3://bkt/sets/x") == p and location(p) is p
    with pytest.raises(TypeError):
        Path(p)  # no __fspath__: never a local path
    with pytest.raises(ValueError, match="credentials in a URL"):
        location("s3://AKIA:secret@bkt/x")
    with pytest.raises(ValueError, match="no bucket"):
        location("s3:///x")


def test_ranges_and_files_read_the_same_from_the_store_as_from_bytes(env, tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    url = location(f"s3://{new_bucket(env)}/f/blob.bin")
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    store.put_bytes(url, data)
    assert store.size(url) == len(data) and store.is_file(url) and not store.is_file(url.parent / "nope")
    assert store.read_bytes(url) == data and store.size(url.parent / "nope") is None
    # ranges: scattered, adjacent (merged into one request), overlapping, and past the end
    starts = [0, 10, 40, 5_000, 5_100, 150_000, 299_990, 299_000, 400_000]
    sizes = [10, 30, 7, 100, 2_000, 70_000, 50, 1_000, 10]
    requests = list(zip(starts, sizes, strict=True))
    before = env.proxy.requests
    got = store.RangeReader().read([(url, o, n) for o, n in requests])
    assert got == [data[o : o + n] for o, n in requests]  # past the end: short, as a local pread
    assert env.proxy.requests - before < len(requests)  # neighbours were fetched together
    assert store.RangeReader().read([(local, o, n) for o, n in requests]) == got
    # whole files; a missing one is its FileNotFoundError
    missing = url.parent / "missing.bin"
    first, second = store.read_many([url, missing])
    assert first == data and isinstance(second, FileNotFoundError)
    with pytest.raises(FileExistsError):
        store.put_new(url, b"x")
    store.put_new(missing, b"new")
    assert store.list_files(url.parent) == {missing: 3, url: len(data)}
    store.delete(missing)
    store.delete(missing)  # nothing there: no error
    assert list(store.list_files(url.parent)) == [url]


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetched")
    make_fetch_output(root / "in", num_tars=3, per_tar=8)
    shard_dataset(root / "in", root / "local", shard_size=5, workers=1, progress=False)
    return root


def test_shard_into_the_store_writes_the_local_bytes_manifest_last(env, fetched):
    url = f"s3://{new_bucket(env)}/sets/made-up"
    start = len(env.proxy.log)
    manifest, _ = shard_dataset(fetched / "in", url, shard_size=5, workers=2, progress=False)
    local = fetched / "local"
    stored = objects(env, url)
    assert sorted(stored) == sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    for name, data in stored.items():
        assert data == (local / name).read_bytes(), name
    assert manifest.root == location(url) and manifest.split_sizes == Manifest.read(local).split_sizes
    puts = [path for method, path, _ in env.proxy.log[start:] if method == "PUT"]
    assert puts[-1].endswith("/sets/made-up/manifest.json")  # a reader never sees a half-written set
    assert sum(p.endswith(".tar") for p in puts) == len([p for p in stored if p.endswith(".tar")])
    # the lock object is gone, and so is the run's work folder on this node
    assert ".grr.lock" not in stored
    assert not any(Path(os.environ["GRR_CACHE_DIR"]).rglob("*.json"))


def test_an_interrupted_shard_run_into_the_store_resumes_from_its_node_folder(env, fetched):
    url = f"s3://{new_bucket(env)}/sets/resumed"

    def fail(path):
        raise RuntimeError("killed after one shard")

    with pytest.raises(RuntimeError, match="killed"):
        shard_dataset(fetched / "in", url, shard_size=5, workers=1, progress=False, on_shard=fail)
    work = store.node_cache("shard", location(url)) / ".work"
    assert (work / "params.json").is_file()  # the private work folder stays on this node
    assert work.parent.parent == Path(os.environ["GRR_CACHE_DIR"]) / "shard"
    assert "manifest.json" not in objects(env, url)
    _, stats = shard_dataset(fetched / "in", url, shard_size=5, workers=1, progress=False)
    assert stats["kept_shards"] == 1 and stats["reused_tars"] >= 1
    local = fetched / "local"
    assert {n: d for n, d in objects(env, url).items()} == {
        str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert not work.exists()


def test_a_store_lock_from_another_host_is_refused_unless_broken(env, fetched, caplog):
    url = f"s3://{new_bucket(env)}/sets/locked"
    holder = {"pid": 4242, "host": "another-node", "started": 0, "what": "grr data shard"}
    store.put_bytes(location(url) / ".grr.lock", json.dumps(holder).encode())
    with pytest.raises(LockedError, match="another-node"):
        shard_dataset(fetched / "in", url, shard_size=5, workers=1, progress=False)
    assert list(objects(env, url)) == [".grr.lock"]  # nothing written
    shard_dataset(fetched / "in", url, shard_size=5, workers=1, progress=False, break_lock=True)
    assert "manifest.json" in objects(env, url) and ".grr.lock" not in objects(env, url)
    # a lock left on this host by a process that has ended is taken over
    url2 = f"s3://{new_bucket(env)}/sets/stale"
    dead = {**holder, "host": socket.gethostname(), "pid": 2**22 + 12345}
    store.put_bytes(location(url2) / ".grr.lock", json.dumps(dead).encode())
    shard_dataset(fetched / "in", url2, shard_size=5, workers=1, progress=False)
    assert "taking over the lock" in caplog.text


@pytest.mark.slow  # ~11 s
def test_check_of_a_set_in_the_store_reports_what_a_local_check_does(env, tmp_path):
    local = make_shardset(tmp_path / "set", (6, 6, 4))
    url = upload(env, local, f"s3://{new_bucket(env)}/sets/checked")
    report = check_dataset(url, progress=False, workers=2)
    assert report.ok and report.num_samples == {"train": 16} and report.num_shards == 3
    # the same damage in both: a byte of shard 0 changed, shard 1's tar gone, a stray file
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    tar0 = bytearray((local / "train/shard-000000.tar").read_bytes())
    tar0[1600] ^= 0xFF  # inside sample 0's JPEG
    (local / "train/shard-000000.tar").write_bytes(bytes(tar0))
    env.client.put_object(Bucket=bucket, Key=f"{prefix}/train/shard-000000.tar", Body=bytes(tar0))
    (local / "train/shard-000001.tar").unlink()
    env.client.delete_object(Bucket=bucket, Key=f"{prefix}/train/shard-000001.tar")
    (local / "train/shard-000009.tar.tmp").write_bytes(b"left over")
    env.client.put_object(Bucket=bucket, Key=f"{prefix}/train/shard-000009.tar.tmp", Body=b"left over")
    local_report = check_dataset(local, progress=False, workers=1)
    store_report = check_dataset(url, progress=False, workers=2)
    assert len(local_report.problems) == 4  # sha256, CRC32 of sample 0, shard 1 missing, the stray file
    assert store_report.problems == [p.replace(str(local), url) for p in local_report.problems]
    assert store_report.num_samples == local_report.num_samples


def test_cli_shard_and_check_with_s3_urls(env, fetched):
    url = f"s3://{new_bucket(env)}/sets/cli"
    runner = CliRunner()
    result = runner.invoke(app, ["data", "shard", "--input", str(fetched / "in"), "--out", url, "--shard-size", "5",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"wrote {url}" in result.output
    result = runner.invoke(app, ["data", "check", url, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"ok: {url}: 5 shards match manifest.json" in result.output


def test_a_store_that_cannot_be_reached_at_start_is_one_line_naming_url_and_endpoint(env, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("GRR_STORE_RETRY_S", "1")
    url = "s3://no-such-reach/sets/x"
    with pytest.raises(StoreUnavailable) as caught:
        Manifest.read(url)
    message = str(caught.value)
    assert message.startswith(f"{url}/manifest.json: the store at {dead} (AWS_ENDPOINT_URL) did not answer")
    assert "\n" not in message and "GRR_STORE_RETRY_S" in message
    result = CliRunner().invoke(app, ["data", "check", url])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {url}/manifest.json: the store at {dead}")


@pytest.mark.slow  # ~8 s: the trainer's imports
def test_training_on_a_store_that_cannot_be_reached_is_one_line(env, monkeypatch, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("GRR_STORE_RETRY_S", "1")
    url = "s3://no-such-reach/sets/x"
    result = CliRunner().invoke(app, ["train", "pretrain", "--preset", "grr-tiny", "--data", url,
                                      "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {url}/manifest.json: the store at {dead}")
