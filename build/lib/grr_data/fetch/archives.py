"""Reading images out of a zip, a tar (plain or compressed) or a folder, in a fixed order, by file name."""

from __future__ import annotations

import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from grr_data.fetch.common import FetchError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def iter_archive(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield (base file name, read) for every image file in `path`.

    A folder is read lazily; archives are read in one sequential pass as they go (seeking in a
    compressed tar would decompress it again for every image, and the archive is closed once the
    iteration ends, before a caller's last shard is written).
    """
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                    yield name, Path(root, name).read_bytes
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = os.path.basename(info.filename)
                if not info.is_dir() and name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                    data = zf.read(info)
                    yield name, (lambda data=data: data)
    elif path.is_file() and tarfile.is_tarfile(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                for info in tar:
                    name = os.path.basename(info.name)
                    if info.isfile() and name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                        data = tar.extractfile(info).read()
                        yield name, (lambda data=data: data)
        except (tarfile.TarError, EOFError) as err:
            raise FetchError(f"{path}: damaged tar archive ({err}); download it again") from err
    elif not path.exists():
        raise FetchError(f"{path}: no such file or folder")
    else:
        raise FetchError(f"{path}: not a zip, a tar or a folder of images")
