"""Fault injection, data side (issue 10): each test plants one exact fault and checks that it is
detected, counted and named, or survived, never used silently.

Every test here failed on the code before these checks existed (noted per test); the slow ones
start processes and send them signals.
"""

import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from shardset import VOCAB_SIZE, make_shardset  # noqa: E402
from test_shard import jpeg, make_fetch_output, write_tar  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from grr_cli.main import app  # noqa: E402
from grr_data.check import check_dataset  # noqa: E402
from grr_data.format.layout import check_layout  # noqa: E402
from grr_data.format.records import (  # noqa: E402
    ShardWriter,
    decode_ids,
    encode_ids,
    index_path,
    iter_tar_samples,
    read_index,
)
from grr_data.infra.lock import LOCK_NAME, LockedError, hold_lock  # noqa: E402
from grr_data.loader import make_loader  # noqa: E402
from grr_data.shard.run import shard_dataset  # noqa: E402
from grr_data.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = ["cpu", pytest.param("dali", marks=pytest.mark.dali)]  # tests/conftest.py: skipped or failed without DALI
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


# ---------------------------------------------------------------- every sample verified when read


@pytest.fixture(scope="module")
def made_set(tmp_path_factory):
    """A set made by the real `grr data shard` (2 tars of 8 samples, shards of 4)."""
    root = tmp_path_factory.mktemp("faults")
    make_fetch_output(root / "in", num_tars=2, per_tar=8)
    shard_dataset(root / "in", root / "set", split="100/0", shard_size=4, workers=1, progress=False)
    return root / "set"


@pytest.fixture
def data(made_set, tmp_path):
    shutil.copytree(made_set, tmp_path / "set")
    return tmp_path / "set"


def member(root: Path, local: int, ext: str, shard: str = "train/shard-000000.tar") -> tuple[Path, str, int, int]:
    """(tar path, sample key, offset, size) of one member of sample `local` of a shard."""
    tar = root / shard
    table = read_index(index_path(tar))
    col = table.column(ext)
    return tar, table.keys[local], int(table.offsets[local, col]), int(table.sizes[local, col])


def read_all(root: Path, kind: str, num_workers: int = 0):
    """A whole epoch in plan order; returns the loader and the keys of the real (not substitute) slots."""
    loader = make_loader(root, "train", batch_size=4, kind=kind, shuffle=False, num_workers=num_workers,
                         with_keys=True)
    batches = list(loader)
    return loader, [k for b in batches for k, real in zip(b["keys"], b["real"].tolist(), strict=True) if real]


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_byte_in_a_jpeg_is_caught_counted_and_named(data, kind, caplog):
    """Old code: the damaged image was decoded and trained on, nothing counted."""
    tar, key, offset, size = member(data, 1, "jpg")
    raw = bytearray(tar.read_bytes())
    # a byte in the middle of the entropy-coded data, away from markers (0xFF)
    at = next(i for i in range(offset + size // 2, offset + size) if 0x10 < raw[i] < 0xF0 and raw[i - 1] != 0xFF)
    raw[at] ^= 0x01
    Image.open(io.BytesIO(bytes(raw[offset : offset + size]))).load()  # Pillow alone sees nothing wrong
    tar.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="grr.loader"):
        loader, keys = read_all(data, kind)
    assert loader.skipped == {"checksum_mismatch": 1}
    assert key not in keys and len(keys) == loader.shards.num_samples - 1
    assert f"{tar.name} {key} (checksum_mismatch" in caplog.text
    problems = check_dataset(data, progress=False).problems
    assert any(f"sample {key}: CRC32 of .jpg differs from shard-000000.crc" in p for p in problems), problems


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_id_changed_to_another_valid_one_is_caught(data, kind):
    """Old code: the caption was silently another one."""
    special = load_tokenizer(None).special
    tar, key, offset, size = member(data, 2, "ids", shard="train/shard-000001.tar")
    raw = bytearray(tar.read_bytes())
    ids = decode_ids(bytes(raw[offset : offset + size]))
    ids[1] = 10 if ids[1] != 10 else 11  # another ordinary word id
    assert check_layout(ids.tolist(), special) is None  # still a valid layout: only the checksum tells
    raw[offset : offset + size] = encode_ids(ids)
    tar.write_bytes(bytes(raw))
    loader, keys = read_all(data, kind, num_workers=2 if kind == "cpu" else 0)
    assert loader.skipped == {"checksum_mismatch": 1} and key not in keys
    problems = check_dataset(data, progress=False).problems
    assert any(f"sample {key}: CRC32 of .ids differs" in p for p in problems), problems


def _out_of_vocab(root: Path, rewrite: bool) -> str:
    """Put id VOCAB_SIZE + 7 into sample 3's caption: in place (its checksum, if any, no longer
    matches) or by rewriting the shard (new checksums: a set written with the bad id)."""
    tar = root / "train" / "shard-000000.tar"
    samples = list(iter_tar_samples(tar))
    key, members = samples[3]
    ids = decode_ids(members["ids"])
    ids[2] = VOCAB_SIZE + 7
    if rewrite:
        members["ids"] = encode_ids(ids)
        with ShardWriter(tar) as writer:
            for k, m in samples:
                writer.write(k, m)
    else:
        _, _, offset, size = member(root, 3, "ids")
        raw = bytearray(tar.read_bytes())
        raw[offset : offset + size] = encode_ids(ids)
        tar.write_bytes(bytes(raw))
    return key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("checksums,rewrite,reason", [(False, False, "ids_out_of_vocab"),
                                                       (True, True, "ids_out_of_vocab"),
                                                       (True, False, "checksum_mismatch")])
def test_an_out_of_vocabulary_id_is_skipped_and_named(tmp_path, kind, checksums, rewrite, reason, caplog):
    """Old code: the id reached the embedding and raised IndexError naming nothing. Sets sharded
    before per-sample checksums (checksums=False) still load, with their ids checked."""
    root = make_shardset(tmp_path, (6, 6), checksums=checksums)
    key = _out_of_vocab(root, rewrite)
    with caplog.at_level(logging.WARNING, logger="grr.loader"):
        loader, keys = read_all(root, kind)
    assert loader.skipped == {reason: 1} and key not in keys and len(keys) == 11
    assert f"shard-000000.tar {key} ({reason}" in caplog.text
    report = check_dataset(root, progress=False)
    assert any(f"sample {key}: token ids has an id outside the vocabulary" in p for p in report.problems)
    assert any("before per-sample checksums" in w for w in report.warnings) == (not checksums)


def test_a_damaged_or_missing_checksum_file_is_never_a_silent_pass(data):
    crc = data / "train" / "shard-000002.crc"
    raw = bytearray(crc.read_bytes())
    raw[-3] ^= 0xFF  # the last sample's .json checksum: only `grr data check` reads .json
    raw[-3 - 8] ^= 0xFF  # and its .txt one
    crc.write_bytes(bytes(raw))
    problems = check_dataset(data, progress=False).problems
    assert any("CRC32 of .txt, .json differs from shard-000002.crc" in p for p in problems), problems
    crc.unlink()
    with pytest.raises(FileNotFoundError, match="shard-000002.tar: its checksum file shard-000002.crc is missing"):
        make_loader(data, "train", batch_size=4, kind="cpu")
    assert any("shard-000002.crc missing or unreadable" in p for p in check_dataset(data, progress=False).problems)


# ---------------------------------------------------------------- the tokenizer a set was made with


def test_a_tokenizer_with_other_pieces_and_the_same_size_is_told_apart(tmp_path):
    """Old code: both manifests recorded the same name, size and special ids, nothing else."""
    from sentencepiece import sentencepiece_model_pb2

    folder = tmp_path / "t5"
    shutil.copytree(SAMPLE_TOKENIZER_DIR, folder)
    make_fetch_output(tmp_path / "in", num_tars=1, per_tar=4)
    first, _ = shard_dataset(tmp_path / "in", tmp_path / "a", tokenizer=str(folder), progress=False, workers=1)
    # the same folder, now holding a model whose pieces for "dog" and "cat" are swapped
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((folder / "spiece.model").read_bytes())
    pieces = {p.piece: p for p in model.pieces}
    pieces["▁dog"].piece, pieces["▁cat"].piece = "▁cat", "▁dog"
    (folder / "spiece.model").write_bytes(model.SerializeToString())
    second, _ = shard_dataset(tmp_path / "in", tmp_path / "b", tokenizer=str(folder), progress=False, workers=1)
    a, b = first["tokenizer"], second["tokenizer"]
    assert {k: a[k] for k in ("name", "vocab_size", "pad", "eos", "bos", "cls")} == \
        {k: b[k] for k in ("name", "vocab_size", "pad", "eos", "bos", "cls")}
    assert a["files_sha256"]["spiece.model"] != b["files_sha256"]["spiece.model"]
    assert a["library"] == "transformers" and a["library_version"]
    # the fault matters: the same caption is other ids
    assert load_tokenizer(str(folder)).encode_batch(["a dog"])[0][0, 2] != \
        load_tokenizer(None).encode_batch(["a dog"])[0][0, 2]


# ---------------------------------------------------------------- two runs into one folder


HOLD_AFTER_FIRST_SHARD = """
import sys, time
from grr_data.shard.run import shard_dataset
def hold(path):
    print("holding", flush=True)
    time.sleep(600)
shard_dataset(sys.argv[1], sys.argv[2], split="100/0", shard_size=3, workers=int(sys.argv[3]), progress=False,
              on_shard=hold)
"""


def start_holding_shard_run(inputs: Path, out: Path, workers: int) -> subprocess.Popen:
    """A `grr data shard` process stopped (asleep) right after its first shard."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_SHARD, str(inputs), str(out), str(workers)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "holding", f"the shard process did not start (exit {proc.poll()})"
    return proc


@pytest.mark.slow
def test_a_second_shard_run_into_the_same_folder_fails_at_once_naming_the_first(tmp_path, caplog):
    """Old code: the second run 'resumed' the first one's folder, both wrote into it and exited 0."""
    make_fetch_output(tmp_path / "in", num_tars=2, per_tar=6)
    out = tmp_path / "out"
    first = start_holding_shard_run(tmp_path / "in", out, workers=1)
    try:
        started = time.monotonic()
        result = CliRunner().invoke(app, ["data", "shard", "--input", str(tmp_path / "in"), "--out", str(out),
                                          "--split", "100/0", "--shard-size", "3", "--workers", "1"])
        assert result.exit_code == 1, result.output
        assert f"PID {first.pid} on host {socket.gethostname()}" in result.output and "grr data shard" in result.output
        assert time.monotonic() - started < 20  # at once, not after the first run ends
    finally:
        first.kill()  # kill -9: no cleanup runs, the lock file stays behind
        first.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
    with caplog.at_level(logging.WARNING, logger="grr_data.infra.lock"):
        manifest, stats = shard_dataset(tmp_path / "in", out, split="100/0", shard_size=3, workers=1, progress=False)
    assert f"taking over the lock left by grr data shard (PID {first.pid}" in caplog.text
    assert stats["kept_shards"] == 1 and manifest["splits"]["train"]["num_samples"] == 12
    assert not (out / LOCK_NAME).exists() and check_dataset(out, progress=False).ok


def test_a_lock_from_another_host_is_reported_and_broken_only_when_asked(tmp_path, caplog):
    make_fetch_output(tmp_path / "in", num_tars=1, per_tar=3)
    out = tmp_path / "out"
    out.mkdir()
    stale = {"pid": 4242, "host": "gpu-node-17", "started": time.time() - 3 * 3600 - 600, "what": "grr data shard"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    with pytest.raises(LockedError, match=r"PID 4242 on host gpu-node-17.*3 h 10 min ago.*--break-lock"):
        shard_dataset(tmp_path / "in", out, progress=False, workers=1)
    with caplog.at_level(logging.WARNING, logger="grr_data.infra.lock"):
        shard_dataset(tmp_path / "in", out, progress=False, workers=1, break_lock=True)
    assert "breaking the lock of grr data shard (PID 4242 on host gpu-node-17" in caplog.text
    assert (out / "manifest.json").is_file() and not (out / LOCK_NAME).exists()


def test_a_held_lock_cannot_be_broken_and_is_released_on_any_exit(tmp_path):
    with hold_lock(tmp_path, what="grr train"):
        with pytest.raises(LockedError, match=rf"in use by grr train \(PID {os.getpid()}"):
            with hold_lock(tmp_path, break_lock=True):
                pass
    with pytest.raises(KeyError), hold_lock(tmp_path):
        raise KeyError("a failing run")
    assert list(tmp_path.iterdir()) == []
    with hold_lock(tmp_path):  # free again
        pass


def test_without_flock_the_file_itself_is_the_lock(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with hold_lock(tmp_path, what="grr data shard"):
        with pytest.raises(LockedError, match=rf"in use by grr data shard \(PID {os.getpid()}|already"):
            with hold_lock(tmp_path):
                pass
    # a file left by a dead process of this host is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "started": time.time(), "what": "grr data shard"}))
    with hold_lock(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- stop signals and worker processes


LOADER_UNDER_SIGNAL = """
import signal, sys
from grr_data.loader import make_loader
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append("SIGTERM"))
signal.signal(signal.SIGINT, lambda *a: stop.append("SIGINT"))
loader = make_loader(sys.argv[1], batch_size=2, kind="cpu", num_workers=2)
after = 0
while True:
    for batch in loader:
        if not stop:
            print("reading", flush=True)
            continue
        after += 1  # what a trainer does after the signal: finish its step, save, exit
        if after == 20:
            print("saved after", stop[0], flush=True)
            sys.exit(0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_process_group_is_left_to_the_main_process(tmp_path, sig):
    """Old code, SIGTERM: the loader's workers died of it first, so the main process got
    `DataLoader worker ... exited unexpectedly` instead of its chance to save (exit 1). SIGINT
    already passed (torch's workers outlive a KeyboardInterrupt); kept as a guard."""
    root = make_shardset(tmp_path, (10, 10, 5))
    proc = subprocess.Popen([sys.executable, "-c", LOADER_UNDER_SIGNAL, str(root)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "reading"
    os.killpg(proc.pid, sig)  # the whole group, as Slurm, Kubernetes, `timeout` and Ctrl-C do
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"saved after {sig.name}" in out


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie waits only to be reaped


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the pool's workers")
def test_kill_9_of_the_shard_main_process_leaves_no_worker_alive(tmp_path):
    """Old code: the pool's workers stayed alive forever, blocked on their task queue."""
    make_fetch_output(tmp_path / "in", num_tars=4, per_tar=6)
    proc = start_holding_shard_run(tmp_path / "in", tmp_path / "out", workers=2)
    try:
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _running(w)]
    for w in left:  # do not leave them to the next test
        os.kill(w, signal.SIGKILL)
    assert left == []
    # and the killed run resumes to a whole set
    manifest, _ = shard_dataset(tmp_path / "in", tmp_path / "out", split="100/0", shard_size=3, workers=2,
                                progress=False)
    assert manifest["splits"]["train"]["num_samples"] == 24 and check_dataset(tmp_path / "out", progress=False).ok


CLI_HOLDING_AFTER_FIRST_SHARD = """
import sys, time
import grr_data.shard.run
from grr_cli.main import app
finish = grr_data.shard.run._SplitSink.finish_shard
def finish_then_hold(self):
    finish(self)
    if self.shards:
        print("holding", flush=True)
        time.sleep(600)
grr_data.shard.run._SplitSink.finish_shard = finish_then_hold
app(["data", "shard", "--input", sys.argv[1], "--out", sys.argv[2], "--split", "100/0", "--shard-size", "3",
     "--workers", "2"])
"""


@pytest.mark.slow
def test_sigterm_to_a_shard_run_stops_it_cleanly_and_it_resumes(tmp_path):
    """What a reviewer tries next: `timeout` or Slurm stopping `grr data shard` (old code: killed
    outright by SIGTERM, its lock, had it had one, left behind)."""
    make_fetch_output(tmp_path / "in", num_tars=4, per_tar=6)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", CLI_HOLDING_AFTER_FIRST_SHARD, str(tmp_path / "in"), str(out)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    while (line := proc.stdout.readline()) and line.strip() != "holding":
        pass
    assert line, f"the shard run ended before its first shard (exit {proc.wait()})"
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and "rerun the same command" in err, err[-2000:]
    time.sleep(1)
    assert not any(map(_running, workers)) and not (out / LOCK_NAME).exists()
    manifest, stats = shard_dataset(tmp_path / "in", out, split="100/0", shard_size=3, workers=2, progress=False)
    assert stats["kept_shards"] >= 1 and manifest["splits"]["train"]["num_samples"] == 24
    assert check_dataset(out, progress=False).ok


# ---------------------------------------------------------------- images that cannot be stored


def png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 160, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_extreme_aspect_images_are_one_bad_sample_each(tmp_path):
    """Old code: the 1x400 PNG stopped the whole run (`broken data stream when writing image file`)."""
    samples = [{"key": f"good{i}", "jpg": jpeg(i), "txt": "a red dog"} for i in range(3)]
    samples += [{"key": "thin", "png": png((1, 400)), "txt": "a thin line"},
                {"key": "strip", "png": png((1, 3000)), "txt": "a long strip"},
                {"key": "banner", "png": png((3000, 100)), "txt": "a wide banner"},
                {"key": "wide", "png": png((1000, 100)), "txt": "a wide picture"}]  # 10:1 is kept
    write_tar(tmp_path / "in" / "00000.tar", samples)
    manifest, _ = shard_dataset(tmp_path / "in", tmp_path / "out", split="100/0", workers=1, progress=False)
    assert manifest["skipped"] == {"unusable_image": 3}
    assert manifest["splits"]["train"]["num_samples"] == 4
    assert check_dataset(tmp_path / "out", progress=False).ok


MEASURE_PREPARE = """
import resource, sys
from grr_data.shard.samples import prepare_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    prepare_image(data)
    print("stored")
except ValueError as err:
    print(err.args[0])
except Exception as err:
    print(type(err).__name__)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_an_extreme_aspect_image_is_refused_before_it_takes_memory(tmp_path):
    """Old code: resizing a 1x3000 PNG to a 288-pixel shorter side took ~750 MB in the worker."""
    (tmp_path / "strip.png").write_bytes(png((1, 3000)))
    run = subprocess.run([sys.executable, "-c", MEASURE_PREPARE, str(tmp_path / "strip.png")], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    reason, grown_mb = run.stdout.split()
    assert reason == "unusable_image" and int(grown_mb) < 50, run.stdout + run.stderr


def png_bomb(side: int) -> bytes:
    """A real PNG bomb: a side x side black 1-bit image, a few kB of zlib (no pixels drawn here)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes(side * (1 + (side + 7) // 8)), 9)  # each row: filter byte 0, then zeros
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_from_its_header(monkeypatch):
    from grr_data.shard.samples import prepare_image

    bomb = png_bomb(15_000)  # 225 Mpixel in 28 kB: past Pillow's error threshold (2 x 89,478,485 pixels)
    with pytest.raises(ValueError) as err:
        prepare_image(bomb)
    assert err.value.args[0] == "unusable_image" and "exceeds limit of 178956970 pixels" in err.value.args[1]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a program that switched Pillow's check off
    with pytest.raises(ValueError) as err:
        prepare_image(bomb)
    assert err.value.args == ("unusable_image", "15000x15000: more than 178,956,970 pixels (Pillow's "
                                                "decompression-bomb limit)")


def test_loader_skip_counts_are_there_for_the_trainer(tmp_path):
    """`loader.skipped`: samples skipped so far, by reason, what a trainer writes into metrics."""
    images = [jpeg(i, size=(300, 288)) for i in range(6)]
    images[4] = b"not an image"
    root = make_shardset(tmp_path, (6,), images=images)
    loader = make_loader(root, "train", batch_size=3, kind="cpu", shuffle=False, num_workers=0)
    for _ in range(2):
        list(loader)
    assert loader.skipped == {"decode_error": 2}  # once per epoch it was met in


def _square_or_fail(x: int) -> int:
    if x == 5:
        raise ValueError("no fives", x)
    if x == 7:
        os.kill(os.getpid(), signal.SIGKILL)  # a worker killed mid-task (the OOM killer)
    return x * x


def test_the_shard_pool_keeps_order_and_reports_errors_and_dead_workers():
    from grr_data.infra.procs import WorkerPool

    # children from before (multiprocessing's resource tracker, if an earlier test started it) are not the pool's
    before = {pid for pid in _children(os.getpid()) if _running(pid)}
    with WorkerPool(_square_or_fail, 3) as pool:
        assert list(pool.imap([1, 2, 3, 4, 6, 8, 9])) == [1, 4, 9, 16, 36, 64, 81]
    with pytest.raises(ValueError, match="no fives"), WorkerPool(_square_or_fail, 2) as pool:
        list(pool.imap([1, 5, 2]))
    with pytest.raises(RuntimeError, match=r"worker process \d+ ended unexpectedly \(killed by SIGKILL\)"):
        with WorkerPool(_square_or_fail, 2) as pool:
            list(pool.imap([1, 7, 2]))
    assert {pid for pid in _children(os.getpid()) if _running(pid)} <= before
