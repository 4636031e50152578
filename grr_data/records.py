"""The sample format of a sharded set and the tar writer that makes shards and DALI indexes.

A sample is four tar members sharing a key (DESIGN.md): `key.jpg` (shorter side 288),
`key.txt` (the raw caption), `key.ids` (65 little-endian int64 token ids, read by DALI's
webdataset reader with `dtypes=INT64`) and `key.json` (source, split, original size, hash).
Keys contain no dots. Every tar gets a DALI index (`.idx`, format v1.2) written beside it.
Shards are written under a temporary name and renamed, so a partial tar is never mistaken
for a whole one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from grr_data.files import publish
from grr_data.layout import SEQ_LEN

IDS_DTYPE = np.dtype("<i8")
EXTENSIONS = ("jpg", "txt", "ids", "json")
INDEX_VERSION = "v1.2"


def encode_ids(ids) -> bytes:
    arr = np.asarray(ids, dtype=IDS_DTYPE)
    if arr.shape != (SEQ_LEN,):
        raise ValueError(f"token ids must have shape ({SEQ_LEN},), got {arr.shape}")
    return arr.tobytes()


def decode_ids(raw: bytes) -> np.ndarray:
    if len(raw) != SEQ_LEN * IDS_DTYPE.itemsize:
        raise ValueError(f"an .ids record holds {len(raw)} bytes, expected {SEQ_LEN * IDS_DTYPE.itemsize}")
    return np.frombuffer(raw, dtype=IDS_DTYPE).astype(np.int64)


def index_path(tar_path: str | os.PathLike) -> Path:
    return Path(tar_path).with_suffix(".idx")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes one tar shard and its DALI index; call `close()` (or use `with`) to publish both.

    The tar is written as `NAME.tar.tmp` and renamed on close; on an exception it is removed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self._index: list[list[tuple[str, int, int, str]]] = []
        self.num_samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: `members` maps an extension (no dot) to its bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must contain no dots or slashes")
        entry = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            entry.append((ext, self._tar.offset - padded, len(data), name))
        self._index.append(entry)
        self.num_samples += 1

    def close(self) -> None:
        self._tar.close()
        idx = index_path(self.path)
        idx_tmp = idx.with_name(idx.name + ".tmp")
        lines = [f"{INDEX_VERSION} {len(self._index)}"]
        lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in entry) for entry in self._index]
        idx_tmp.write_text("\n".join(lines) + "\n")
        # fsync before renaming: a resumed `grr data shard` keeps every shard it finds published
        publish(self.tmp_path, self.path)
        publish(idx_tmp, idx)

    def abort(self) -> None:
        self._tar.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def sample_members(jpg: bytes, caption: str, ids, meta: dict) -> dict[str, bytes]:
    """The four members of one sample, in the order they are written."""
    return {
        "jpg": jpg,
        "txt": caption.encode("utf-8"),
        "ids": encode_ids(ids),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for each group of consecutive members sharing a key.

    Raises `tarfile.ReadError` (with the file named) when the tar itself is damaged; callers
    that must survive a truncated tar catch it and count what they lost.
    """
    key, members = None, {}
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                prefix = os.path.dirname(info.name)
                sample_key = f"{prefix}/{stem}" if prefix else stem
                if sample_key != key and key is not None:
                    yield key, members
                    members = {}
                key = sample_key
                f = tar.extractfile(info)
                members[ext] = f.read() if f is not None else b""
            _check_tail(tar)
    except (tarfile.ReadError, EOFError, OSError) as err:
        raise tarfile.ReadError(f"{path}: damaged tar ({err}); samples after the damage were lost") from err
    if key is not None:
        yield key, members


def _check_tail(tar: tarfile.TarFile) -> None:
    """tarfile stops quietly at a cut header or at a cut exactly between members; a whole tar
    ends with the end-of-archive marker (two zero blocks), and only zeros follow it."""
    f = tar.fileobj
    f.seek(tar.offset)
    marker = f.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset}: the tar was cut")
    if marker.count(0) != len(marker):
        raise tarfile.ReadError(f"cut or garbled header at byte {tar.offset}")
    while block := f.read(1 << 16):
        if block.count(0) != len(block):
            raise tarfile.ReadError(f"cut or garbled header at byte {tar.offset}")


def read_index_entries(path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI v1.2 index: per sample, its members as (ext, offset, size, member name)."""
    lines = Path(path).read_text().splitlines()
    version, count = lines[0].split()
    if version != INDEX_VERSION:
        raise ValueError(f"{path}: index version {version}, expected {INDEX_VERSION}")
    samples = []
    for line in lines[1 : 1 + int(count)]:
        parts = line.split()
        samples.append([(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                        for i in range(0, len(parts) - 3, 4)])
    if len(samples) != int(count):
        raise ValueError(f"{path}: header says {count} samples, the index lists {len(samples)}")
    return samples


def read_index(path: str | os.PathLike) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI v1.2 index: per sample, {ext: (offset, size)}."""
    return [{ext: (offset, size) for ext, offset, size, _ in entry} for entry in read_index_entries(path)]


def tar_size_for_index(entries: list[list[tuple[str, int, int, str]]]) -> int:
    """The size of the tar ShardWriter writes for these index entries: the last member's padded
    end, the two end-of-archive blocks, rounded up to tarfile's 10 kB record."""
    end = max((offset + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
               for entry in entries for _, offset, size, _ in entry), default=0)
    return -(-(end + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
