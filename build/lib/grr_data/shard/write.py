"""Writing output shards in the workers of `grr data shard`.

The main process plans each shard from metadata alone (grr_data.shard.run): a `ShardJob` names the
output tar and, per input tar (or plain-input chunk), the positions of its kept samples in that
tar's completion record. The worker that gets the job reads those samples' metadata from the
records and their stored JPEGs from the tars' `.jpgs` work files (grr_data.shard.workfiles), writes
the shard, its checksums and its index (grr_data.format.records.ShardWriter), and hashes it for the
manifest. A shard a killed run already completed is kept when its index lists exactly the planned
keys. Which worker writes a shard, and when, does not change its bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from grr_data.format.records import (
    ShardWriter,
    checksum_path,
    index_path,
    read_checksums,
    read_index,
    sample_members,
)
from grr_data.infra import store
from grr_data.infra.store import Location, StoreError, location
from grr_data.shard.samples import InputKind, Sample, ShardError, TarJob, TarResult
from grr_data.shard.workfiles import InputImages, images_path, load_record, prepare_tar

# completion records a worker keeps parsed: a shard's samples come from a few consecutive input tars
_RECORDS_KEPT = 4


@dataclass(frozen=True)
class ShardJob:
    """One output shard to write: its samples as (input unit index, positions in its record), in order."""

    split: str
    number: int
    path: str
    entries: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def num_samples(self) -> int:
        return sum(len(positions) for _, positions in self.entries)


@dataclass(frozen=True)
class ShardDone:
    """What the main process hears back once a shard is complete on disk."""

    split: str
    number: int
    num_samples: int
    sha256: str
    kept: bool  # complete from a killed run, not rewritten
    num_decoded: int  # images decoded again (only when a `.jpgs` work file was gone)


def indexed_keys(tar: Location) -> list[str] | None:
    """The sample keys a complete shard's index lists, or None when tar, checksums or index is
    missing or unreadable, or the tar's size is not the one its index implies (then it is rewritten)."""
    idx, crc = index_path(tar), checksum_path(tar)
    if not (store.is_file(tar) and store.is_file(idx) and store.is_file(crc)):
        return None
    try:
        table = read_index(idx)
        if len(read_checksums(crc)) != len(table):
            return None
    except StoreError:
        raise  # a store that stopped answering is no reason to rewrite the shard
    except (OSError, ValueError):
        return None
    if store.size(tar) != table.tar_size():
        return None
    return table.keys


class ShardWork:
    """A worker's two jobs: an input unit (`TarJob`: grr_data.shard.workfiles.prepare_tar) and an output
    shard (`ShardJob`). Built before the pool forks, so each worker has its own record cache."""

    def __init__(self, units: list[TarJob], kind: InputKind, staging: Path | None = None):
        self.units = units
        self.kind = kind
        self.staging = staging  # where shards bound for a store are written before their upload
        self._records: OrderedDict[int, TarResult] = OrderedDict()
        self._fallback = InputImages(kind)

    def __call__(self, job: TarJob | ShardJob):
        return self.write(job) if isinstance(job, ShardJob) else prepare_tar(job, self.kind)

    def _record(self, unit: int) -> TarResult:
        if unit in self._records:
            self._records.move_to_end(unit)
        else:
            self._records[unit] = load_record(self.units[unit])
            if len(self._records) > _RECORDS_KEPT:
                self._records.popitem(last=False)
        return self._records[unit]

    def write(self, job: ShardJob) -> ShardDone:
        path = location(job.path)
        samples = [(unit, record.samples[p]) for unit, positions in job.entries
                   for record in [self._record(unit)] for p in positions]
        keys = [sample.key for _, sample in samples]
        found = indexed_keys(path)
        if found is not None:
            if found != keys:
                raise ShardError(f"{path}: an existing shard does not hold the samples planned for it; "
                                 "the input changed since the interrupted run; delete the output folder")
            return ShardDone(job.split, job.number, len(keys), store.sha256(path), True, 0)
        decoded = self._fallback.num_decoded
        files: dict[int, BinaryIO | None] = {}
        try:
            with ShardWriter(path, self.staging) as writer:
                for unit, sample in samples:
                    jpg = self._jpg(files, unit, sample)
                    writer.write(sample.key, sample_members(jpg, sample.caption, sample.ids,
                                                            dict(sample.meta, split=job.split)))
        finally:
            for f in files.values():
                if f is not None:
                    f.close()
        return ShardDone(job.split, job.number, len(keys), writer.sha256, False,
                         self._fallback.num_decoded - decoded)

    def _jpg(self, files: dict[int, BinaryIO | None], unit: int, sample: Sample) -> bytes:
        """The stored JPEG from the unit's `.jpgs`, else read back from the input (a resumed run whose
        `.jpgs` was deleted once the shards of the first run holding these samples were written)."""
        if unit not in files:
            try:
                files[unit] = open(images_path(self.units[unit].record), "rb")  # closed by write()
            except FileNotFoundError:
                files[unit] = None
        f = files[unit]
        if f is None or sample.stored is None:
            return self._fallback.jpg(self.units[unit].path, sample)
        f.seek(sample.stored[0])
        jpg = f.read(sample.stored[1])
        if len(jpg) != sample.stored[1]:
            raise ShardError(f"{f.name}: shorter than its completion record says; delete the output folder "
                             "and shard again")
        return jpg
