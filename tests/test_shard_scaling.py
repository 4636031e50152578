"""`grr data shard` with workers that write the shards (issue 12): the output is byte for byte the
same for any worker count, and the main process never receives image bytes."""

import json
import os
import pickle
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from test_shard import caption, jpeg, make_fetch_output, write_tar  # noqa: E402

import grr_data.infra.procs  # noqa: E402
from grr_data.check import check_dataset  # noqa: E402
from grr_data.shard.run import shard_dataset  # noqa: E402
from grr_data.shard.workfiles import TarSummary  # noqa: E402
from grr_data.shard.write import ShardDone, ShardJob  # noqa: E402

ARGS = {"split": "60/40", "shard_size": 4, "progress": False}


@pytest.fixture(scope="module")
def varied_input(tmp_path_factory):
    """5 tars: plain JPEGs with two captions per image, images to re-encode (PNG, too large), bad
    samples, an empty tar, a copy of an image under another id."""
    root = tmp_path_factory.mktemp("scaling")
    make_fetch_output(root, num_tars=3, per_tar=10)
    write_tar(root / "00003.tar", [
        {"key": "png", "png": jpeg(50, size=(500, 400), fmt="PNG"), "txt": "an old car"},
        {"key": "big", "jpg": jpeg(51, size=(800, 600)), "txt": "a big red tree"},
        {"key": "bad", "jpg": b"not a jpeg", "txt": "a cat"},
        {"key": "copy", "jpg": jpeg(0), "txt": caption(3), "json": {"image_id": "other"}},
        {"key": "nocap", "jpg": jpeg(52)},
    ] + [{"key": f"x{i}", "jpg": jpeg(60 + i), "txt": caption(60 + i)} for i in range(7)])
    write_tar(root / "00004.tar", [{"key": "bad", "jpg": b"\xff\xd8\xff nothing", "txt": "a dog"}])
    return root


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_shards_indexes_checksums_and_manifest_are_identical_for_1_2_and_3_workers(varied_input, tmp_path):
    outputs = []
    for workers in (1, 2, 3):
        manifest, _ = shard_dataset(varied_input, tmp_path / f"w{workers}", workers=workers, **ARGS)
        outputs.append(_files(tmp_path / f"w{workers}"))
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    names = sorted(outputs[0])
    assert "manifest.json" in names and any(n.endswith(".crc") for n in names) and any(n.endswith(".idx") for n in names)
    assert not any(".work" in n or n.endswith(".jpgs") for n in names)
    # the input exercised what it should: re-encoded images, skips, a duplicate, several shards per split
    assert manifest["resized_images"] == 2 and manifest["duplicate_images"] == 1
    assert manifest["skipped"] == {"corrupt_image": 2, "missing_caption": 1}
    assert all(len(split["shards"]) >= 3 for split in manifest["splits"].values())
    assert check_dataset(tmp_path / "w2", progress=False, workers=2).ok


def test_the_main_process_never_receives_image_bytes(varied_input, tmp_path, monkeypatch):
    """Everything the pool hands back to the main process, as it crossed the pipe: tar summaries
    and finished-shard notes, no JPEG (a JPEG starts with FF D8 FF; PNG input is checked too)."""
    received = []
    next_done = grr_data.infra.procs.WorkerPool.next_done

    def recording(self):
        tag, value = next_done(self)
        received.append((tag, pickle.dumps(value)))
        return tag, value

    monkeypatch.setattr(grr_data.infra.procs.WorkerPool, "next_done", recording)
    manifest, _ = shard_dataset(varied_input, tmp_path / "out", workers=2, **ARGS)
    kinds = {type(pickle.loads(raw)) for _, raw in received}
    assert kinds == {TarSummary, ShardDone}
    num_shards = sum(len(split["shards"]) for split in manifest["splits"].values())
    assert sum(isinstance(tag, ShardJob) for tag, _ in received) == num_shards
    assert not [tag for tag, raw in received if b"\xff\xd8\xff" in raw or b"\x89PNG" in raw]
    num_samples = sum(split["num_samples"] for split in manifest["splits"].values())
    # per sample: its image hash, ids, and where it came from, not its image (~40 kB here)
    assert sum(len(raw) for _, raw in received) < 400 * num_samples
    # and what the main process sends: shard plans of (input tar, positions), not samples
    jobs = [tag for tag, _ in received if isinstance(tag, ShardJob)]
    assert all(isinstance(p, int) for job in jobs for _, positions in job.entries for p in positions)


def test_work_images_are_deleted_once_their_shards_are_written(varied_input, tmp_path):
    """The `.jpgs` work files live only while a shard still to be written holds their samples."""
    alive = []

    def look(path):
        alive.append(len(list((tmp_path / "out" / ".work" / "tars").glob("*.jpgs"))))

    shard_dataset(varied_input, tmp_path / "out", workers=1, on_shard=look, **ARGS)
    assert min(alive) <= 1 and max(alive) <= 3, alive  # never all 5 tars' images at once
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(alive) == sum(len(split["shards"]) for split in manifest["splits"].values())


def _square(x: int) -> int:
    return x * x


def test_the_pool_gives_results_as_they_finish_and_reports_a_worker_that_died_idle():
    import signal
    import time

    from grr_data.infra.procs import WorkerPool

    with WorkerPool(_square, 2) as pool:
        pool.submit(3, "a")
        pool.submit(4, "b")
        assert pool.num_idle == 0
        assert sorted(pool.next_done() for _ in range(2)) == [("a", 9), ("b", 16)]
        assert pool.num_idle == 2
    with pytest.raises(RuntimeError, match=r"worker process \d+ ended unexpectedly \(killed by SIGKILL\)"):
        with WorkerPool(_square, 1) as pool:
            os.kill(pool._workers[0][0], signal.SIGKILL)  # the OOM killer, between two items
            time.sleep(0.5)
            pool.submit(5, "c")
            pool.next_done()
