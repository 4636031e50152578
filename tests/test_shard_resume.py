"""A killed `grr data shard` run, restarted, gives byte-identical shards without decoding again the
input tars it had finished (their completion records stand in)."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from test_shard import jpeg, make_fetch_output, shard_hashes, write_tar  # noqa: E402

import grr_data.shard.tars  # noqa: E402
from grr_data.check import check_dataset  # noqa: E402
from grr_data.shard.run import shard_dataset  # noqa: E402
from grr_data.shard.samples import TarJob  # noqa: E402
from grr_data.shard.tars import TarInput, process_tar  # noqa: E402
from grr_data.shard.workfiles import InputImages, images_path, run_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARGS = {"split": "70/30", "shard_size": 3, "progress": False}
PER_TAR = 12  # make_fetch_output's default: 3 tars of 12 samples
KILL_IN_SECOND_SHARD = """
import os, signal, sys
from grr_data.format.records import ShardWriter
from grr_data.shard.run import shard_dataset
done, write = [], ShardWriter.write
def write_then_die(self, key, members):
    write(self, key, members)
    if done:  # a real kill halfway through the second shard: no cleanup runs
        os.kill(os.getpid(), signal.SIGKILL)
ShardWriter.write = write_then_die
shard_dataset(sys.argv[1], sys.argv[2], split="70/30", shard_size=3, workers=1, progress=False, on_shard=done.append)
"""
KILL_AFTER_SHARDS = """
import os, signal, sys
from grr_data.shard.run import shard_dataset
done = []
def die(path):  # the main process killed while its two workers write and decode
    done.append(path)
    if len(done) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
shard_dataset(sys.argv[1], sys.argv[2], split="70/30", shard_size=3, workers=2, progress=False, on_shard=die)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_fetch_output(root / "in")
    shard_dataset(root / "in", root / "whole", workers=1, **ARGS)
    return root


def test_killed_run_resumes_to_identical_shards(reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_SHARD, str(reference / "in"), str(out)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists() and (out / ".work" / "params.json").is_file()
    done = sorted(p.name for p in out.glob("*/*.tar"))
    assert len(done) == 1
    records = sorted(p.name for p in (out / ".work" / "tars").glob("*.json.gz"))
    assert records and len(records) < 3, records  # at least the tar being written when killed
    left_over = sorted(p.name for p in out.glob("*/*.tmp"))
    assert left_over == ["shard-000001.tar.tmp"], "the killed run should have left a half-written shard"
    # a kill between the tar's rename and its index's: the tar alone must not count as complete
    later = next(out.glob("*/*.tar")).with_name("shard-000002.tar")
    later.write_bytes(b"partial")

    manifest, stats = shard_dataset(reference / "in", out, workers=2, **ARGS)
    assert stats["kept_shards"] == 1
    # decoding is counted in the workers: only the tars without a record were decoded again
    assert stats["reused_tars"] == len(records)
    assert stats["decoded_images"] == (3 - len(records)) * PER_TAR
    assert shard_hashes(out) == shard_hashes(reference / "whole")
    assert manifest["splits"] == json.loads((reference / "whole" / "manifest.json").read_text())["splits"]
    assert not list(out.glob("*/*.tmp")) and not (out / ".work").exists()
    assert check_dataset(out, progress=False).ok


@pytest.mark.parametrize("kill_after", [1, 3])
def test_a_killed_pool_run_resumes_to_identical_shards_and_manifest(reference, tmp_path, kill_after):
    """The main process killed while two workers decode and write: resumed with three."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, str(reference / "in"), str(out), str(kill_after)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(list(out.glob("*/*.idx"))) >= kill_after and not (out / "manifest.json").exists()
    _, stats = shard_dataset(reference / "in", out, workers=3, **ARGS)
    assert stats["kept_shards"] >= kill_after
    assert shard_hashes(out) == shard_hashes(reference / "whole")
    assert (out / "manifest.json").read_bytes() == (reference / "whole" / "manifest.json").read_bytes()


def test_resume_without_the_work_images_reads_them_back_from_the_input(reference, tmp_path):
    """A `.jpgs` work file is deleted once its samples' shards are written; a shard that must be
    written again after that (damaged, deleted) takes its images from the input tar."""
    out = tmp_path / "out"
    _fail_at_second_shard(reference, out)
    images = list((out / ".work" / "tars").glob("*.jpgs"))
    assert len(images) == 1  # the first tar's, still needed by shards not yet written
    images[0].unlink()
    _, stats = shard_dataset(reference / "in", out, workers=2, **ARGS)
    assert stats["kept_shards"] == 2 and stats["reused_tars"] == 1
    assert shard_hashes(out) == shard_hashes(reference / "whole")


def test_failed_run_resumes_and_other_arguments_are_refused(reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_at_second_shard(reference, out)
    assert not list(out.glob("*/*.tmp"))  # an exception aborts open writers
    with pytest.raises(FileExistsError, match="other arguments"):
        shard_dataset(reference / "in", out, workers=1, **(ARGS | {"shard_size": 4}))
    records = list((out / ".work" / "tars").glob("*.json.gz"))
    assert len(records) == 1  # the first tar alone fills three shards (4 train, 8 val): the failure is in it
    decoded = []
    real_prepare = grr_data.shard.tars.prepare_image
    monkeypatch.setattr(grr_data.shard.tars, "prepare_image", lambda data: decoded.append(1) or real_prepare(data))
    _, stats = shard_dataset(reference / "in", out, workers=1, **ARGS)
    assert stats["kept_shards"] == 2 and stats["reused_tars"] == 1
    assert len(decoded) == stats["decoded_images"] == 2 * PER_TAR  # the first tar's images are not decoded
    assert shard_hashes(out) == shard_hashes(reference / "whole")


def test_a_record_restores_samples_and_their_images(tmp_path):
    # one JPEG kept as is, one PNG the first run re-encoded: both come back byte for byte
    write_tar(tmp_path / "00000.tar", [{"key": "a", "jpg": jpeg(1), "txt": "a red dog"},
                                       {"key": "b", "png": jpeg(2, size=(500, 400), fmt="PNG"), "txt": "an old car"},
                                       {"key": "c", "jpg": b"not a jpeg", "txt": "a cat"}])
    job = TarJob(str(tmp_path / "00000.tar"), None, None, "made-up", False, str(tmp_path / "rec.json.gz"))
    stored = [s.jpg for s in process_tar(job).samples]  # what a run without work files would store
    assert len(stored) == 2
    first = run_job(job, TarInput())
    assert not first.from_record and first.num_decoded == 3 and Path(job.record).is_file()
    # the worker keeps no image: the stored JPEGs are in the tar's `.jpgs`, where the samples say
    work_images = images_path(job.record).read_bytes()
    assert [s.jpg for s in first.samples] == [None, None]
    assert [work_images[s.stored[0]: s.stored[0] + s.stored[1]] for s in first.samples] == stored
    again = run_job(job, TarInput())
    assert again.from_record and again.num_decoded == 0
    assert again.skipped == first.skipped and again.problems == first.problems
    images = InputImages(TarInput())
    for old, new, jpg in zip(first.samples, again.samples, stored, strict=True):
        assert new.jpg is None and (new.key, new.caption, new.meta, new.identity, new.stored) == \
            (old.key, old.caption, old.meta, old.identity, old.stored)
        assert (new.ids == old.ids).all()
        assert images.jpg(job.path, new) == jpg  # read back from the input when the `.jpgs` is gone
    assert images.num_decoded == 1  # only the re-encoded one
    # an input changed since the record was written is refused, naming the tar and member
    write_tar(tmp_path / "00000.tar", [{"key": "a", "jpg": jpeg(3), "txt": "a red dog"}])
    with pytest.raises(RuntimeError, match="00000.tar: a.jpg is missing or changed"):
        InputImages(TarInput()).jpg(job.path, again.samples[0])


def _fail_at_second_shard(reference, out):
    shards = []

    def fail(path):
        shards.append(path)
        if len(shards) == 2:
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        shard_dataset(reference / "in", out, workers=1, on_shard=fail, **ARGS)


def test_cli_reports_run_and_output_errors_without_a_traceback(reference, tmp_path):
    from typer.testing import CliRunner

    from grr_cli.main import app

    def run(out):
        return CliRunner().invoke(app, ["data", "shard", "--input", str(reference / "in"), "--out", str(out),
                                        "--split", "70/30", "--shard-size", "3", "--workers", "1"])

    (tmp_path / "a-file").write_text("in the way")
    result = run(tmp_path / "a-file" / "out")  # the output cannot be created
    assert result.exit_code == 1 and "error:" in result.output and "a-file" in result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    # a resumed run whose completion record belongs to another input tar
    out = tmp_path / "out"
    _fail_at_second_shard(reference, out)
    record = next((out / ".work" / "tars").glob("*.json.gz"))
    with gzip.open(record, "rt") as f:
        data = json.load(f)
    with gzip.open(record, "wt") as f:
        json.dump(data | {"tar": "/elsewhere/00000.tar"}, f)
    result = run(out)
    assert result.exit_code == 1 and "error:" in result.output and "another run's work" in result.output
    assert isinstance(result.exception, SystemExit)


def test_resume_rewrites_a_cut_shard_and_refuses_a_refetched_input(reference, tmp_path):
    out = tmp_path / "out"
    _fail_at_second_shard(reference, out)
    kept = sorted(out.glob("*/shard-*.tar"))
    assert kept
    # a shard whose tar lost its end (its index is whole): rewritten, not kept
    kept[0].write_bytes(kept[0].read_bytes()[:-10240])
    _, stats = shard_dataset(reference / "in", out, workers=1, **ARGS)
    assert stats["kept_shards"] == len(kept) - 1
    assert shard_hashes(out) == shard_hashes(reference / "whole")

    # an input tar refetched with the same size but other content: its completion record is stale
    inputs = tmp_path / "in"
    shutil.copytree(reference / "in", inputs)
    out = tmp_path / "out2"
    with pytest.raises(ZeroDivisionError):
        shard_dataset(inputs, out, workers=1, on_shard=lambda path: 1 / 0, **ARGS)
    tar = inputs / "00000.tar"
    data = bytearray(tar.read_bytes())
    at = data.index(b"00000001.txt") + 512  # the caption of the second sample
    data[at] = ord("X") if data[at] != ord("X") else ord("Y")
    stat = tar.stat()
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(FileExistsError, match="other arguments or input"):
        shard_dataset(inputs, out, workers=1, **ARGS)


def test_shard_writer_fsyncs_before_publishing(tmp_path, monkeypatch):
    from grr_data.format.records import ShardWriter, sample_members

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with ShardWriter(tmp_path / "s.tar") as writer:
        writer.write("a", sample_members(b"jpg", "a dog", [0] * 65, {}))
    assert str(tmp_path / "s.tar.tmp") in synced and str(tmp_path / "s.idx.tmp") in synced
