"""Publishing files atomically: write under a temporary name, fsync, rename, so that a crash or a
kill leaves either the old file or the whole new one, never a partial one under the final name."""

from __future__ import annotations

import json
import os
from pathlib import Path


def publish(tmp: Path, path: Path) -> None:
    """fsync `tmp` (already written and closed) and rename it to `path`; fsync the folder so the
    rename itself survives a power loss."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: dict, indent: int = 2, ensure_ascii: bool = False) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n", encoding="utf-8")
    publish(tmp, path)
