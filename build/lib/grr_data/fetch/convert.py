"""Writing img2dataset-format folders ourselves, one sample per caption, for sources that are not URL lists.

Used by the archive converters (roco, flickr30k, mscoco from local folders) and to expand a folder
that img2dataset fetched one image at a time into one sample per (image, caption) pair. A shard is
`NNNNN.tar` (key.jpg, key.txt, key.json), `NNNNN.parquet` (one row per attempted sample) and
`NNNNN_stats.json`, written in that order, each under a temporary name; the stats file marks the
shard complete, so a rerun skips it without reading its images again.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from grr_data.format.image import open_image, to_stored_jpeg
from grr_data.infra.files import publish, tmp_path_for, write_json_atomic

SHARD_DIGITS = 5  # img2dataset's oom_shard_count


@dataclass
class SourceImage:
    """One image of a source and all its captions; `read` gives its encoded bytes only when needed."""

    image_id: str
    captions: list[str]
    source: str  # URL or archive member, kept as the sample json's "url"
    read: Callable[[], bytes] | None
    extra: dict = field(default_factory=dict)  # e.g. source_split; copied into every sample's json
    final: dict | None = None  # set when `read` already gives the final JPEG: width, height, original_*, sha256
    error: str | None = None  # failed upstream (e.g. download): every caption is counted as failed


def resize_to_jpeg(raw: bytes) -> tuple[bytes, dict]:
    """Resize so the shorter side is IMAGE_SIZE (grr_data.format.image: as img2dataset's keep_ratio; a
    large image within its memory bound)."""
    with open_image(raw) as img:
        jpg, (width, height), size = to_stored_jpeg(img)
    info = {"width": size[0], "height": size[1], "original_width": width, "original_height": height,
            "sha256": sha256(raw).hexdigest()}
    return jpg, info


def _key(shard_id: int, index: int, shard_size: int) -> str:
    # img2dataset's key scheme, so keys look alike whichever path wrote them
    oom = math.ceil(math.log10(shard_size)) if shard_size > 1 else 1
    return f"{shard_id * 10**oom + index:0{oom + SHARD_DIGITS}d}"


def _failure_status(err: BaseException) -> tuple[str, str]:
    if isinstance(err, (FileNotFoundError, KeyError)):
        return "failed_to_download", f"missing file: {err}"
    return "failed_to_resize", f"cannot decode image: {err}"


class PairWriter:
    """Collects images and writes their (image, caption) pairs in shards of `shard_size` samples."""

    def __init__(self, folder: Path, shard_size: int, on_progress: Callable[[int], None] | None = None,
                 first_shard: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.on_progress = on_progress or (lambda n: None)
        self.pending: list[tuple[SourceImage, int]] = []
        self.first_shard = first_shard
        self.shard_id = first_shard  # > 0 to add shards to a folder (a retry pass) with keys of their own
        self.shards_skipped = 0

    def add(self, image: SourceImage) -> None:
        for index in range(len(image.captions)):
            self.pending.append((image, index))
            if len(self.pending) == self.shard_size:
                self._flush()

    def close(self) -> None:
        if self.pending:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.shard_id:0{SHARD_DIGITS}d}"
        stats_path = self.folder / f"{name}_stats.json"
        if stats_path.exists():
            self.shards_skipped += 1
        else:
            self._write_shard(name, stats_path)
        self.on_progress(len(self.pending))
        self.pending = []
        self.shard_id += 1

    def _encode(self, image: SourceImage) -> tuple[bytes | None, dict, str | None, str | None]:
        """(jpeg, size info, status, error message) for one image."""
        if image.error is not None:
            return None, {}, "failed_to_download", image.error
        try:
            raw = image.read()
            if image.final is not None:
                return raw, image.final, "success", None
            jpg, info = resize_to_jpeg(raw)
            return jpg, info, "success", None
        except Exception as err:  # noqa: BLE001  (any undecodable image is counted, not fatal)
            status, message = _failure_status(err)
            return None, {}, status, message

    def _write_shard(self, name: str, stats_path: Path) -> None:
        start = time.time()
        rows, status_dict = [], Counter()
        counts = Counter()
        tar_path = self.folder / f"{name}.tar"
        tmp_tar = tmp_path_for(tar_path)
        cached_image, cached = None, None
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, (image, caption_index) in enumerate(self.pending):
                if image is not cached_image:
                    cached_image, cached = image, self._encode(image)
                jpg, info, status, message = cached
                caption = image.captions[caption_index]
                key = _key(self.shard_id, index, self.shard_size)
                meta = {"url": image.source, "caption": caption, "key": key, "status": status,
                        "error_message": message, "width": info.get("width"), "height": info.get("height"),
                        "original_width": info.get("original_width"),
                        "original_height": info.get("original_height"), "sha256": info.get("sha256"),
                        "image_id": image.image_id, **image.extra}
                rows.append(meta)
                counts[status] += 1
                status_dict[message or "success"] += 1
                if jpg is None:
                    continue
                for ext, data in (("jpg", jpg), ("txt", caption.encode("utf-8")),
                                  ("json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))):
                    member = tarfile.TarInfo(f"{key}.{ext}")
                    member.size = len(data)
                    member.mode = 0o644
                    member.mtime = int(start)
                    tar.addfile(member, io.BytesIO(data))
        publish(tmp_tar, tar_path)
        parquet_path = self.folder / f"{name}.parquet"
        tmp_parquet = tmp_path_for(parquet_path)
        pq.write_table(pa.Table.from_pylist(rows), tmp_parquet)
        publish(tmp_parquet, parquet_path)
        stats = {"count": len(rows), "successes": counts["success"],
                 "failed_to_download": counts["failed_to_download"],
                 "failed_to_resize": counts["failed_to_resize"], "duration": time.time() - start,
                 "start_time": start, "end_time": time.time(), "status_dict": dict(status_dict)}
        write_json_atomic(stats_path, stats, indent=4)
