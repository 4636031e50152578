"""Random access to the samples of one split of a sharded set (CONTRACTS.md "Sharded set").

Takes the set's `Manifest`, checks every shard and its DALI index are there and agree on sample
counts, and reads samples' members by global number at the offsets the `.idx` file gives, through
grr_data.infra.store's RangeReader: `os.pread` on local files (no shared file position, so it is
safe in forked workers); ranged GETs for a set in an object store (`s3://`, `gs://`), all of a
batch's samples at once (`read_many`), each sample's adjacent members in one request. Index files
are parsed into small arrays once, in the loader's process before its workers fork, so the
workers share them; keys are kept only when asked for, so a 12M-sample set costs ~40 bytes a
sample, not a Python dict each. A set in a store has them all read when it is opened (concurrent
requests), so a store that cannot be reached, or a shard missing from it, is an error at start.

What a node keeps of a set in a store: its indexes and checksums in memory, as for a local set;
samples only while their batch is read ahead and decoded (`read_ahead` batches per reader), never
on disk, and each sample is fetched once per epoch (its plan's padding repeats aside).

Every read is verified where its bytes are read (both loaders read through here): the CRC32 of
the image and of the token ids against the shard's `.crc` file (~11 us for a 40 KB JPEG; the
decode that follows costs ~3 ms), the ids against the vocabulary and the layout's fixed
positions. A sample that fails is a SampleError: skipped, counted and logged like any bad one;
a shard deleted or replaced in the store after the manifest is counted the same way (its reads
fail, come short or fail their CRC32). A store that stops answering is not a bad sample: its
StoreUnavailable (after grr_data.infra.store's retries) is raised, never skipped.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np

from grr_data.format.layout import CLS_INDEX
from grr_data.format.manifest import Manifest
from grr_data.format.records import (
    EXTENSIONS,
    INDEX_VERSION,
    checksum_path,
    decode_ids,
    index_path,
    parse_checksums,
    parse_index,
    read_index,
)
from grr_data.infra import store
from grr_data.infra.progress import progress
from grr_data.infra.store import Location

READ_AHEAD = 2  # batches a reader of a set in a store fetches ahead of the one it decodes
_INDEX_BATCH = 64  # shards whose index files are fetched together


class SampleError(Exception):
    """A sample that cannot be used; `reason` is the key it is counted under in `skipped`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


READ = ("jpg", "ids")  # the members a loader reads


@dataclass
class ShardIndex:
    offsets: np.ndarray  # (n, 2) int64: jpg offset, ids offset (-1 when the member is missing)
    sizes: np.ndarray  # (n, 2) int64
    crcs: np.ndarray | None  # (n, 2) uint32: their CRC32s at shard time; None for sets made before them
    keys: list[str] | None


def _shard_index(tar: Location, idx_raw: bytes, crc_raw: bytes | None, count: int, keep_keys: bool) -> ShardIndex:
    table = parse_index(idx_raw.decode("utf-8"), index_path(tar), keep_keys)
    if len(table) != count:
        raise ValueError(f"{index_path(tar)}: lists {len(table)} samples, but manifest.json says {count}: the shard "
                         "and manifest disagree, re-shard the set")
    offsets = np.full((len(table), 2), -1, dtype=np.int64)
    sizes = np.zeros((len(table), 2), dtype=np.int64)
    for col, ext in enumerate(READ):
        if (c := table.column(ext)) is not None:
            offsets[:, col], sizes[:, col] = table.offsets[:, c], table.sizes[:, c]
    crcs = None
    if crc_raw is not None:
        crcs = parse_checksums(crc_raw, checksum_path(tar))[:, [EXTENSIONS.index(ext) for ext in READ]].copy()
        if len(crcs) != len(table):
            raise ValueError(f"{checksum_path(tar)} lists {len(crcs)} samples, {index_path(tar).name} "
                             f"{len(table)}: re-shard or restore the set")
    return ShardIndex(offsets, sizes, crcs, table.keys)


class ShardSet:
    """One split of a sharded set: `num_samples`, `special`, `read(g)`, `read_many(gs)`, `key(g)`."""

    def __init__(self, data: Manifest | str | os.PathLike, split: str = "train", keep_keys: bool = False):
        manifest = Manifest.of(data)
        self.root = manifest.root
        self.remote = store.is_remote(self.root)
        self.special = manifest.special
        # Sets sharded before per-sample checksums existed have none: their samples are checked
        # for token ids inside the vocabulary and the layout's fixed positions only.
        self.checksums = manifest.sample_checksums
        entry = manifest.split(split)
        self.paths = [self.root / s.path for s in entry.shards]
        self.counts = np.array([s.num_samples for s in entry.shards], dtype=np.int64)
        needed = [f for path in self.paths for f in self._files(path)]
        present = store.existing(needed)
        for path, count in zip(self.paths, self.counts, strict=True):
            self._check_shard(path, int(count), present)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.num_samples = int(self.starts[-1])
        if self.num_samples != entry.num_samples:
            raise ValueError(
                f"{manifest.path}: split {split!r} says {entry.num_samples} samples but its "
                f"shards add up to {self.num_samples}: the manifest is inconsistent, re-shard the set"
            )
        self.keep_keys = keep_keys
        self._indexes: dict[int, ShardIndex] = {}
        self._ranges = store.RangeReader()
        if self.remote:
            # a store's failures (unreachable, an index gone) come now, not at the first batch
            self.load_indexes()

    @property
    def read_ahead(self) -> int:
        """Batches a reader should fetch ahead of the one it decodes: a store's latency hides behind
        the decoding of the batch before; local reads come from the page cache and need none."""
        return READ_AHEAD if self.remote else 0

    def _files(self, path: Location) -> tuple[Location, ...]:
        return (path, index_path(path), checksum_path(path)) if self.checksums else (path, index_path(path))

    def _check_shard(self, path: Location, count: int, present: set) -> None:
        idx = index_path(path)
        if path not in present or idx not in present:
            raise FileNotFoundError(f"{path} or its index {idx.name} is missing: re-shard or restore the set")
        if self.checksums and checksum_path(path) not in present:
            raise FileNotFoundError(f"{path}: its checksum file {checksum_path(path).name} is missing (manifest.json "
                                    "says every shard has one): re-shard or restore the set")
        if self.remote:
            return  # its whole index is read next, and its count checked there
        with open(idx) as f:
            head = f.readline().split()
        if len(head) != 2 or head[0] != INDEX_VERSION or int(head[1]) != count:
            raise ValueError(
                f"{idx}: header {' '.join(head)!r}, but manifest.json says {count} samples "
                f"(index {INDEX_VERSION}): the shard and manifest disagree, re-shard the set"
            )

    def locate(self, g: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, g, side="right")) - 1
        return shard, int(g - self.starts[shard])

    def _load(self, shards: list[int]) -> None:
        """Read and parse the index (and checksum) files of `shards` (in a store: concurrently)."""
        files = [f for s in shards for f in self._files(self.paths[s])[1:]]
        raw = store.read_many(files)
        for f, data in zip(files, raw, strict=True):
            if isinstance(data, BaseException):
                raise FileNotFoundError(f"{f} is missing: re-shard or restore the set") from data
        per = len(files) // max(len(shards), 1)
        for k, s in enumerate(shards):
            idx_raw, *crc_raw = raw[k * per : (k + 1) * per]
            self._indexes[s] = _shard_index(self.paths[s], idx_raw, crc_raw[0] if crc_raw else None,
                                            int(self.counts[s]), self.keep_keys)

    def _index(self, shard: int) -> ShardIndex:
        if shard not in self._indexes:
            self._load([shard])
        return self._indexes[shard]

    def load_indexes(self) -> None:
        """Parse every shard's index now (~2 s per million samples), so that forked workers share
        them instead of each parsing them again every epoch."""
        todo = [s for s in range(len(self.paths)) if s not in self._indexes]
        with progress(total=len(todo), desc="reading shard indexes", unit="shard", disable=len(todo) < 64) as bar:
            for start in range(0, len(todo), _INDEX_BATCH):
                self._load(todo[start : start + _INDEX_BATCH])
                bar.update(len(todo[start : start + _INDEX_BATCH]))

    def describe(self, g: int) -> str:
        """'shard-000001.tar key' for log lines."""
        shard, local = self.locate(g)
        keys = self._index(shard).keys if self.keep_keys else read_index(index_path(self.paths[shard])).keys
        return f"{self.paths[shard].name} {keys[local]}"

    def key(self, g: int) -> str:
        if not self.keep_keys:
            raise RuntimeError("keys were not kept: open the ShardSet with keep_keys=True")
        shard, local = self.locate(g)
        return self._index(shard).keys[local]

    def read(self, g: int) -> tuple[bytes, np.ndarray]:
        """(jpeg bytes, ids (65,) int64) of sample g, verified against the CRC32s recorded at shard
        time (sets that have them) and the vocabulary; raises SampleError when it is unusable."""
        (result,) = self.read_many([g])
        if isinstance(result, SampleError):
            raise result
        return result

    def read_many(self, gs) -> list[tuple[bytes, np.ndarray] | SampleError]:
        """`read(g)` of each of `gs`: its result, or its SampleError. The members are read together
        (a store: one batch of concurrent requests); StoreUnavailable is raised, not returned."""
        wanted = []  # per sample: (shard, local, [(request number, size) per member up to a missing one])
        requests: list[tuple[Location, int, int]] = []
        for g in gs:
            shard, local = self.locate(int(g))
            index = self._index(shard)
            members = []
            for col in range(len(READ)):
                off, size = int(index.offsets[local, col]), int(index.sizes[local, col])
                if off < 0:
                    break
                members.append((len(requests), size))
                requests.append((self.paths[shard], off, size))
            wanted.append((shard, local, members))
        data = self._ranges.read(requests) if requests else []
        out: list = []
        for shard, local, members in wanted:
            try:
                out.append(self._verify(self._indexes[shard], local, [(data[i], size) for i, size in members]))
            except SampleError as err:
                out.append(err)
        return out

    def _verify(self, index: ShardIndex, local: int, members: list[tuple[bytes | OSError, int]]):
        out = []
        for col, ext in enumerate(READ):
            if col >= len(members):
                raise SampleError("missing_member", f"no .{ext} member")
            data, size = members[col]
            if isinstance(data, OSError):
                raise SampleError("read_error", f"reading .{ext}: {data}") from data
            if len(data) != size:
                raise SampleError("truncated_shard", f".{ext} cut short ({len(data)} of {size} bytes)")
            if index.crcs is not None and zlib.crc32(data) != index.crcs[local, col]:
                raise SampleError("checksum_mismatch", f".{ext} has CRC32 {zlib.crc32(data):08x}, the shard run "
                                  f"recorded {int(index.crcs[local, col]):08x}: the shard changed or is damaged "
                                  "since it was written; `grr data check` lists every such sample")
            out.append(data)
        try:
            ids = decode_ids(out[1])
        except ValueError as err:
            raise SampleError("bad_ids", str(err)) from err
        self._check_ids(ids)
        return out[0], ids

    def _check_ids(self, ids: np.ndarray) -> None:
        """Ids an embedding can look up and the layout's fixed positions (BOS, CLS, final PAD);
        the full layout rule is `grr data check`'s (it costs ~20x more)."""
        sp = self.special
        if ids.min() < 0 or ids.max() >= sp.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= sp.vocab_size)][0])
            raise SampleError("ids_out_of_vocab", f"token id {bad} is outside the vocabulary (0..{sp.vocab_size - 1})")
        if ids[0] != sp.bos or ids[CLS_INDEX] != sp.cls or ids[-1] != sp.pad:
            raise SampleError("bad_layout", f"token ids {ids[[0, CLS_INDEX, -1]].tolist()} at positions 0, "
                              f"{CLS_INDEX}, -1; the layout puts BOS {sp.bos}, CLS {sp.cls}, PAD {sp.pad} there")

    def close(self) -> None:
        self._ranges.close()
