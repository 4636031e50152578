"""img2dataset tars as `grr data shard` input (`key.jpg`, `key.txt`, `key.json` per sample), as
`grr data fetch` writes them: tars directly in the input folder, or in split subfolders (`train/`,
`val/`, `test/`). One tar is one worker job and one resume unit.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from grr_data.format.records import iter_tar_samples
from grr_data.shard.samples import (
    IMAGE_EXTENSIONS,
    InputError,
    Sample,
    TarJob,
    TarResult,
    prepare_image,
    read_caption,
    tokenize_pending,
)
from grr_data.shard.split import SampleIdentity, normalize_split

# Split subfolders are read test, val, train, so that under the `source` rule the first copy of
# an image seen twice is the evaluation one (see grr_data.shard.split).
FOLDER_ORDER = ("test", "val", "train")


@dataclass
class TarInput:
    """The `InputKind` (grr_data.shard.samples) of img2dataset tars. Each worker has its own copy,
    with the header map of the one tar it last read back from."""

    name: str = "tars"
    unit_name: str = "tar"
    has_source_splits: bool = True
    _path: str | None = field(default=None, repr=False, compare=False)
    _offsets: dict = field(default_factory=dict, repr=False, compare=False)

    def process(self, job: TarJob, images: BinaryIO | None = None) -> TarResult:
        return process_tar(job, images)

    def read_back(self, unit_path: str, sample: Sample) -> tuple[bytes, str]:
        """(The image member's bytes, found by offset from the tar headers alone; b"" when it is gone,
        where it was looked for)."""
        if unit_path != self._path:
            self._path, self._offsets = unit_path, _member_offsets(unit_path)
        where = self._offsets.get(sample.member)
        raw = b""
        if where is not None:
            with open(unit_path, "rb") as f:
                f.seek(where[0])
                raw = f.read(where[1])
        return raw, f"{unit_path}: {sample.member}"


def find_tars(input_dir: Path) -> list[tuple[Path, str | None]]:
    """(tar path, split subfolder or None) in processing order; [] when the folder holds no tars."""
    found = []
    for sub in sorted(p for p in input_dir.iterdir() if p.is_dir()):
        split = normalize_split(sub.name)
        if split is not None and any(sub.glob("*.tar")):
            found.append((FOLDER_ORDER.index(split), sub, split))
    if found:
        if any(input_dir.glob("*.tar")):
            raise InputError(f"{input_dir}: holds both tars and split subfolders; shard one or the other")
        inputs = [(tar, split) for _, sub, split in sorted(found) for tar in sorted(sub.glob("*.tar"))]
    else:
        inputs = [(tar, None) for tar in sorted(input_dir.glob("*.tar"))]
    _refuse_unfinished(inputs)
    return inputs


def _stats_path(tar: Path) -> Path:
    return tar.with_name(tar.stem + "_stats.json")


def _refuse_unfinished(inputs: list[tuple[Path, str | None]]) -> None:
    """img2dataset writes a tar in place and its stats file last, so in a fetch output with stats
    files a tar without one was cut off by a killed fetch (a hand-made input has none at all)."""
    unfinished = [tar for tar, _ in inputs if not _stats_path(tar).is_file()]
    if unfinished and len(unfinished) < len(inputs):
        more = f" and {len(unfinished) - 1} more" if len(unfinished) > 1 else ""
        raise InputError(f"{unfinished[0]}{more}: no {_stats_path(unfinished[0]).name} beside it, so its fetch "
                         "did not finish; rerun `grr data fetch` with the same --out to complete it")


def _expected_count(tar: Path) -> int | None:
    """How many samples img2dataset says it wrote into this tar (its NNNNN_stats.json)."""
    stats = _stats_path(tar)
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def output_key(job: TarJob, key: str) -> str:
    prefix = f"{job.folder_split}_" if job.folder_split else ""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}{Path(job.path).stem}_{key}")


def process_tar(job: TarJob, images: BinaryIO | None = None) -> TarResult:
    """Validate, resize and tokenize every sample of one input tar (runs in a worker). With `images`
    (the tar's `.jpgs` work file, grr_data.shard.workfiles), each stored JPEG is written there as soon
    as it is ready and its sample keeps only where (`Sample.stored`), so a worker holds one image at
    a time, not a whole tar's."""
    result = TarResult()
    tar_name = f"{job.folder_split}/{Path(job.path).name}" if job.folder_split else Path(job.path).name
    pending: list[tuple[str, bytes | tuple[int, int], str, dict, SampleIdentity, str, bool]] = []
    seen_keys: set[str] = set()
    num_groups = 0

    def skip(reason: str, key: str, detail: str) -> None:
        result.skipped[reason] += 1
        result.problems.append((reason, f"{tar_name}:{key}", detail))

    try:
        for key, members in iter_tar_samples(job.path):
            num_groups += 1
            if key in seen_keys:
                skip("duplicate_key", key, "key appears twice in the tar")
                continue
            seen_keys.add(key)
            try:
                caption = read_caption(members.get("txt"))
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if image_ext is None:
                    raise ValueError("missing_image", "no image member")
                result.num_decoded += 1
                jpg, orig_size, resized = prepare_image(members[image_ext])
            except ValueError as err:
                skip(err.args[0], key, err.args[1])
                continue
            try:
                info = json.loads(members.get("json", b"{}") or b"{}")
                info = info if isinstance(info, dict) else {}
            except ValueError:
                info = {}
            split = job.folder_split or normalize_split(info.get("source_split"))
            if job.need_source_split and split is None:
                skip("no_source_split", key, f"no split folder and source_split={info.get('source_split')!r}")
                continue
            digest = hashlib.sha256(members[image_ext]).digest()
            image_id = str(info["image_id"]) if info.get("image_id") is not None else None
            meta = {"source": job.source, "source_key": f"{tar_name}:{key}", "image_sha256": digest.hex(),
                    "original_size": [info.get("original_width") or orig_size[0],
                                      info.get("original_height") or orig_size[1]]}
            for name in ("image_id", "url"):
                if info.get(name) is not None:
                    meta[name] = info[name]
            identity = SampleIdentity(digest, image_id, split)
            if images is not None:
                images.write(jpg)
                jpg = (images.tell() - len(jpg), len(jpg))
            pending.append((output_key(job, key), jpg, caption, meta, identity, f"{key}.{image_ext}", resized))
    except tarfile.ReadError as err:
        expected = _expected_count(Path(job.path))
        # the group being read when the damage hit is lost too, so count it when stats are missing
        lost = max(expected - num_groups, 0) if expected is not None else 1
        result.damaged = True
        result.skipped["lost_in_damaged_tar"] += lost
        result.problems.append(("damaged_tar", tar_name, f"{err}; {lost} sample(s) lost"))
    else:
        expected = _expected_count(Path(job.path))
        if expected is not None and num_groups < expected:
            # a tar cut exactly between members reads as whole; only the stats file tells
            result.skipped["lost_in_short_tar"] += expected - num_groups
            result.problems.append(("lost_in_short_tar", tar_name, f"holds {num_groups} samples, its stats file "
                                    f"says {expected}; {expected - num_groups} sample(s) lost"))

    tokenize_pending(job, result, pending)
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
