"""Publishing files and folders atomically, the one place grr does it (data, fetch, checkpoints,
metrics): write under a temporary name, fsync, rename, fsync the folder, so that a crash, a kill
or a power loss leaves either the old file or the whole new one, never a partial one under the
final name; and the SHA-256 of a file, which shards, checkpoints and fetch records all keep. Only
the standard library, so any part of grr may import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: str | os.PathLike) -> Path:
    """A hidden temporary name beside `path`, unique per process (two processes writing the
    same file never share a temporary)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished `tmp` (a closed file, or a folder whose files are already fsync'ed) to
    `path`, replacing what is there; the parent folder is fsync'ed so the rename itself survives.

    A folder replacing an older folder: the old one is moved aside first (a rename cannot replace
    a non-empty folder) and deleted once the new one is in place."""
    tmp, path = Path(tmp), Path(path)
    fsync_path(tmp)
    old = None
    if tmp.is_dir() and path.is_dir():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2, ensure_ascii: bool = False) -> None:
    """`data` as JSON, ending in a newline."""
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n")
