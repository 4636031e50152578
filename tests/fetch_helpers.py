"""Helpers shared by the fetch tests: small JPEGs, reading back an img2dataset-format folder, and
the processes a stopped fetch may have left."""

import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from grr_data.fetch import img2ds
from grr_data.format.records import iter_tar_samples


def jpeg(size, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def read_split(folder: Path) -> list[dict]:
    """Every sample of an img2dataset-format folder: json meta plus the decoded image size."""
    samples = []
    for tar in sorted(folder.glob("*.tar")):
        for _, members in iter_tar_samples(tar):
            meta = json.loads(members["json"])
            assert members["txt"].decode() == meta["caption"]
            with Image.open(io.BytesIO(members["jpg"])) as img:
                meta["size"] = img.size
            samples.append(meta)
    return samples


def _shards_in_this_process(processes_count, downloader, reader, subjob_size, max_shard_retry):
    for row in reader:
        downloader(row)


@pytest.fixture
def no_worker_pool(monkeypatch):
    """img2dataset minus grr's worker pool (grr_data.fetch.img2ds.distribute_shards): reader,
    downloader, resizer, writers and the logger process all run as usual, the shards just run here
    one by one (the sample and stop-signal tests cover the pool)."""
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    monkeypatch.setattr(img2ds, "distribute_shards", _shards_in_this_process)


def running_in_group(pgid: int) -> list[int]:
    """The processes of process group `pgid` that have not ended (a zombie has: it waits only to be
    reaped, which a container's PID 1 may never do)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def left_running(pgid: int, pids: list[int], timeout: float = 10.0, but: tuple[int, ...] = ()) -> list[int]:
    """`pids`, and any other process of group `pgid`, still running after up to `timeout` seconds
    (a process's last exit steps may take a moment after its parent has gone); `but` are not counted."""
    deadline = time.monotonic() + timeout
    while True:
        left = sorted((set(running_in_group(pgid)) | {p for p in pids if running(p)}) - set(but))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
