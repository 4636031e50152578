"""Per-input-tar work files, so workers write the shards and a resumed `grr data shard` run skips
decoding finished tars.

When a worker has processed an input tar it writes, in `OUT/.work/tars/`, two files (each
atomically, the record last): `NNNNNN.jpgs`, the stored JPEG of each sample one after the
other, and the completion record `NNNNNN.json.gz` with every per-sample decision: output key,
caption, token ids, json meta (image sha256 included), split identity, where its stored JPEG lies
in `NNNNNN.jpgs`, the image's member name in the input tar and whether it was re-encoded, plus
the tar's skip counts and problem lines. The main process gets only a `TarSummary` (what the
split decision reads, never image bytes); the worker that later writes a shard reads the samples
planned for it from these two files (grr_data.shard.write). A rerun loads the record instead of
decoding the tar again. Once every shard holding a tar's samples is written, the main process
deletes its `.jpgs`; should a resumed run still need one of those samples (a shard damaged after
it was written), `InputImages` reads the image back by offset from the input tar, checks its
sha256, and re-encodes it (deterministically) only when the first run did. So the output is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grr_data.infra.files import publish, tmp_path_for
from grr_data.shard.samples import InputKind, Sample, ShardError, TarJob, TarResult, prepare_image
from grr_data.shard.split import SampleIdentity

RECORDS_DIR = "tars"
RECORD_VERSION = 3


def record_path(work_dir: Path, index: int) -> Path:
    return work_dir / RECORDS_DIR / f"{index:06d}.json.gz"


def images_path(record: str | Path) -> Path:
    """The stored JPEGs written beside a completion record."""
    record = Path(record)
    return record.with_name(record.name.removesuffix(".json.gz") + ".jpgs")


@dataclass
class TarSummary:
    """What the main process gets back for one input tar: counts, problem lines, and per kept
    sample only what the split decision reads. Never image bytes (tests/test_shard_scaling.py)."""

    identities: list[tuple[bytes, str | None, str | None]] = field(default_factory=list)  # SampleIdentity fields
    source_keys: list[str] = field(default_factory=list)  # `tar:key` per sample, for problem lines
    skipped: Counter = field(default_factory=Counter)
    damaged: bool = False
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    num_truncated: int = 0
    num_resized: int = 0
    num_decoded: int = 0
    from_record: bool = False


def summarize(result: TarResult) -> TarSummary:
    return TarSummary(
        [(s.identity.image_sha256, s.identity.image_id, s.identity.source_split) for s in result.samples],
        [s.meta["source_key"] for s in result.samples], result.skipped, result.damaged, result.problems,
        result.num_truncated, result.num_resized, result.num_decoded, result.from_record)


def prepare_tar(job: TarJob, kind: InputKind) -> TarSummary:
    """A worker's first job for an input unit: process it and write its `.jpgs` and completion record,
    unless an earlier run did; returns its summary."""
    return summarize(run_job(job, kind))


def run_job(job: TarJob, kind: InputKind) -> TarResult:
    """The unit's completion record when an earlier run finished it, else the unit processed by its
    input kind, writing its stored JPEGs and its record (runs in a worker). Samples come back without
    image bytes when there is a record path."""
    if job.record is not None and Path(job.record).is_file():
        return load_record(job)
    if job.record is None:
        return kind.process(job)
    path = images_path(job.record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            result = kind.process(job, f)
            for sample in result.samples:  # a plain chunk's samples come back with their bytes
                if sample.jpg is not None:
                    sample.stored = (f.tell(), len(sample.jpg))
                    f.write(sample.jpg)
                    sample.jpg = None
        publish(tmp, path)  # before the record: a record always has its images
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
                     "source_split": s.identity.source_split, "stored": s.stored} for s in result.samples],
    }
    path = Path(job.record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    # level 1: the records are temporary and ~1 KB a sample before compression; json.dumps, not
    # json.dump: only the one-shot encoder is the C one (json.dump was 11% of a worker's time)
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        f.write(json.dumps(data))
    publish(tmp, path)


def load_record(job: TarJob) -> TarResult:
    with gzip.open(job.record, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if data.get("version") != RECORD_VERSION:
        raise ShardError(f"{job.record}: a completion record of version {data.get('version')} (this grr writes "
                         f"{RECORD_VERSION}): the interrupted run was made by another grr version; delete the output "
                         "folder and shard again")
    if data.get("tar") != job.path:
        raise ShardError(f"{job.record}: a completion record for {data.get('tar')}, expected {job.path}; "
                           "the output folder holds another run's work: delete it and start again")
    result = TarResult(skipped=Counter(data["skipped"]), damaged=data["damaged"],
                       problems=[tuple(p) for p in data["problems"]],
                       num_truncated=data["num_truncated"], num_resized=data["num_resized"], from_record=True)
    for s in data["samples"]:
        identity = SampleIdentity(bytes.fromhex(s["meta"]["image_sha256"]), s["image_id"], s["source_split"])
        result.samples.append(Sample(s["key"], None, s["caption"], np.asarray(s["ids"], dtype=np.int64), s["meta"],
                                     identity, s["member"], s["resized"], s["stored"] and tuple(s["stored"])))
    return result


class InputImages:
    """Reads the stored image of samples restored from a record back from their input (the worker
    writing a shard, when the unit's `.jpgs` is gone), through the run's input kind."""

    def __init__(self, kind: InputKind):
        self.kind = kind
        self.num_decoded = 0

    def jpg(self, unit_path: str, sample: Sample) -> bytes:
        if sample.jpg is not None:
            return sample.jpg
        raw, where = self.kind.read_back(unit_path, sample)
        return self.restored(raw, sample, where)

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
