"""Random access to the samples of one split of a sharded set (CONTRACTS.md "Sharded set").

Takes the set's `Manifest`, checks every shard and its DALI index are there and agree on sample
counts, and reads one sample's members by global number with `os.pread` at the offsets the
`.idx` file gives (no shared file position, so it is safe in forked workers). Index files are
parsed into small arrays once, in the loader's process before its workers fork, so the workers
share them; keys are kept only when asked for, so a 12M-sample set costs ~40 bytes a sample,
not a Python dict each.

Every read is verified where its bytes are read (both loaders read through here): the CRC32 of
the image and of the token ids against the shard's `.crc` file (~11 us for a 40 KB JPEG; the
decode that follows costs ~3 ms), the ids against the vocabulary and the layout's fixed
positions. A sample that fails is a SampleError: skipped, counted and logged like any bad one.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grr_data.format.layout import CLS_INDEX
from grr_data.format.manifest import Manifest
from grr_data.format.records import (
    EXTENSIONS,
    INDEX_VERSION,
    checksum_path,
    decode_ids,
    index_path,
    read_checksums,
    read_index,
)
from grr_data.infra.progress import progress

MAX_OPEN = 128


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


def _shard_index(tar: Path, keep_keys: bool, checksums: bool) -> ShardIndex:
    table = read_index(index_path(tar), keep_keys)
    offsets = np.full((len(table), 2), -1, dtype=np.int64)
    sizes = np.zeros((len(table), 2), dtype=np.int64)
    for col, ext in enumerate(READ):
        if (c := table.column(ext)) is not None:
            offsets[:, col], sizes[:, col] = table.offsets[:, c], table.sizes[:, c]
    crcs = None
    if checksums:
        crcs = read_checksums(checksum_path(tar))[:, [EXTENSIONS.index(ext) for ext in READ]].copy()
        if len(crcs) != len(table):
            raise ValueError(f"{checksum_path(tar)} lists {len(crcs)} samples, {index_path(tar).name} "
                             f"{len(table)}: re-shard or restore the set")
    return ShardIndex(offsets, sizes, crcs, table.keys)


class ShardSet:
    """One split of a sharded set: `num_samples`, `special`, `read(g)`, `key(g)`."""

    def __init__(self, data: Manifest | str | os.PathLike, split: str = "train", keep_keys: bool = False):
        manifest = Manifest.of(data)
        self.root = manifest.root
        self.special = manifest.special
        # Sets sharded before per-sample checksums existed have none: their samples are checked
        # for token ids inside the vocabulary and the layout's fixed positions only.
        self.checksums = manifest.sample_checksums
        entry = manifest.split(split)
        self.paths = [self.root / s.path for s in entry.shards]
        counts = np.array([s.num_samples for s in entry.shards], dtype=np.int64)
        for path, count in zip(self.paths, counts, strict=True):
            self._check_shard(path, int(count), self.checksums)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self.starts[-1])
        if self.num_samples != entry.num_samples:
            raise ValueError(
                f"{manifest.path}: split {split!r} says {entry.num_samples} samples but its "
                f"shards add up to {self.num_samples}: the manifest is inconsistent, re-shard the set"
            )
        self.keep_keys = keep_keys
        self._indexes: dict[int, ShardIndex] = {}
        self._fds: dict[int, int] = {}

    @staticmethod
    def _check_shard(path: Path, count: int, checksums: bool) -> None:
        idx = index_path(path)
        if not path.is_file() or not idx.is_file():
            raise FileNotFoundError(f"{path} or its index {idx.name} is missing: re-shard or restore the set")
        if checksums and not checksum_path(path).is_file():
            raise FileNotFoundError(f"{path}: its checksum file {checksum_path(path).name} is missing (manifest.json "
                                    "says every shard has one): re-shard or restore the set")
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

    def _index(self, shard: int) -> ShardIndex:
        if shard not in self._indexes:
            self._indexes[shard] = _shard_index(self.paths[shard], self.keep_keys, self.checksums)
        return self._indexes[shard]

    def load_indexes(self) -> None:
        """Parse every shard's index now (~2 s per million samples), so that forked workers share
        them instead of each parsing them again every epoch."""
        todo = [s for s in range(len(self.paths)) if s not in self._indexes]
        for shard in progress(todo, desc="reading shard indexes", unit="shard", disable=len(todo) < 64):
            self._index(shard)

    def _fd(self, shard: int) -> int:
        # Descriptors are kept open (at most MAX_OPEN a process, so a set of thousands of shards
        # stays under the usual 1024 limit); workers forked after the parent's reads share them
        # safely because pread never moves a shared file position.
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= MAX_OPEN:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.paths[shard], os.O_RDONLY)
        self._fds[shard] = fd  # most recently used last
        return fd

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
        shard, local = self.locate(g)
        index = self._index(shard)
        out = []
        for col, ext in enumerate(READ):
            off, size = int(index.offsets[local, col]), int(index.sizes[local, col])
            if off < 0:
                raise SampleError("missing_member", f"no .{ext} member")
            try:
                data = os.pread(self._fd(shard), size, off)
            except OSError as err:
                raise SampleError("read_error", f"reading .{ext}: {err}") from err
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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):
        # Descriptors do not travel to spawned workers; each process opens its own.
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state
