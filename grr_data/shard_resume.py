"""Per-input-tar completion records, so a resumed `grr data shard` run skips decoding finished tars.

When a worker has processed an input tar it writes `OUT/.work/tars/NNNNNN.json.gz` (atomically)
with every per-sample decision: output key, caption, token ids, json meta (image sha256 included),
split identity, the image's member name in the input tar and whether it was re-encoded, plus the
tar's skip counts and problem lines. A rerun loads the record instead of decoding the tar again.
Only samples that land in a shard still to be written need their image: `InputImages` reads it
back by offset from the input tar, checks its sha256, and re-encodes it (deterministically) only
when the first run did. So the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from grr_data.files import publish, tmp_path_for
from grr_data.shard_input import Sample, ShardError, TarJob, TarResult, prepare_image, process_tar
from grr_data.split import SampleIdentity

RECORDS_DIR = "tars"
RECORD_VERSION = 2


def record_path(work_dir: Path, index: int) -> Path:
    return work_dir / RECORDS_DIR / f"{index:06d}.json.gz"


def run_job(job: TarJob) -> TarResult:
    """The tar's completion record when an earlier run finished it, else process_tar and write one
    (runs in a worker)."""
    if job.record is not None and Path(job.record).is_file():
        return load_record(job)
    result = process_tar(job)
    if job.record is not None:
        save_record(job, result)
    return result


def save_record(job: TarJob, result: TarResult) -> None:
    data = {
        "version": RECORD_VERSION,
        "tar": job.path,
        "skipped": dict(result.skipped),
        "damaged": result.damaged,
        "problems": result.problems,
        "num_truncated": result.num_truncated,
        "num_resized": result.num_resized,
        "samples": [{"key": s.key, "member": s.member, "resized": s.resized, "caption": s.caption,
                     "ids": s.ids.tolist(), "meta": s.meta, "image_id": s.identity.image_id,
                     "source_split": s.identity.source_split} for s in result.samples],
    }
    path = Path(job.record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    # level 1: the records are temporary and ~1 KB a sample before compression
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        json.dump(data, f)
    publish(tmp, path)


def load_record(job: TarJob) -> TarResult:
    with gzip.open(job.record, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if data.get("version") != RECORD_VERSION or data.get("tar") != job.path:
        raise ShardError(f"{job.record}: a completion record for {data.get('tar')}, expected {job.path}; "
                           "the output folder holds another run's work: delete it and start again")
    result = TarResult(skipped=Counter(data["skipped"]), damaged=data["damaged"],
                       problems=[tuple(p) for p in data["problems"]],
                       num_truncated=data["num_truncated"], num_resized=data["num_resized"], from_record=True)
    for s in data["samples"]:
        identity = SampleIdentity(bytes.fromhex(s["meta"]["image_sha256"]), s["image_id"], s["source_split"])
        result.samples.append(Sample(s["key"], None, s["caption"], np.asarray(s["ids"], dtype=np.int64), s["meta"],
                                     identity, s["member"], s["resized"]))
    return result


def _member_offsets(path: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} from the tar headers alone (no image data is read)."""
    found = {}
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                found[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError):
        pass  # a damaged tar: its record lists only samples from the readable part
    return found


class InputImages:
    """Reads the stored image of samples restored from a record back from their input tar (main
    process; samples arrive tar by tar, so one tar's header map is kept at a time)."""

    def __init__(self):
        self.num_decoded = 0
        self._path: str | None = None
        self._offsets: dict[str, tuple[int, int]] = {}

    def jpg(self, tar_path: str, sample: Sample) -> bytes:
        if sample.jpg is not None:
            return sample.jpg
        if tar_path != self._path:
            self._path, self._offsets = tar_path, _member_offsets(tar_path)
        where = self._offsets.get(sample.member)
        raw = b""
        if where is not None:
            with open(tar_path, "rb") as f:
                f.seek(where[0])
                raw = f.read(where[1])
        return self.restored(raw, sample, f"{tar_path}: {sample.member}")

    def restored(self, raw: bytes, sample: Sample, where: str) -> bytes:
        """The stored JPEG of a sample restored from a completion record, from its input bytes `raw`:
        checked against the hash the record holds, re-prepared when the first run resized it."""
        if hashlib.sha256(raw).hexdigest() != sample.meta["image_sha256"]:
            raise ShardError(f"{where} is missing or changed since the interrupted run; "
                             "delete the output folder and shard again")
        if not sample.resized:
            return raw
        self.num_decoded += 1
        return prepare_image(raw)[0]
