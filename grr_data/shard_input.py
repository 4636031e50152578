"""Reading the input of `grr data shard`: finding the input tars and turning one of them
into validated, tokenized samples (the per-tar work a process pool runs in parallel).

Input is img2dataset's format (`key.jpg`, `key.txt`, `key.json` per sample), either as tars
directly in the input folder or in split subfolders (`train/`, `val/`, `test/`); or, without
tars, a user's own images (a folder with captions beside them, or a CSV/JSONL list), read in
chunks that play the role of tars (grr_data.plain_input). Every image is
fully decoded, since a truncated JPEG is only caught that way; an image whose shorter side is
not 288 (or that is not an upright RGB/greyscale JPEG) is resized and re-encoded (grr_data.image).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from grr_data.image import UnusableImage, check_usable, is_stored_form, to_stored_jpeg
from grr_data.records import iter_tar_samples
from grr_data.split import SampleIdentity, normalize_split
from grr_data.tokenizer import load_tokenizer

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Split subfolders are read test, val, train, so that under the `source` rule the first copy of
# an image seen twice is the evaluation one (see grr_data.split).
FOLDER_ORDER = ("test", "val", "train")


class InputError(ValueError):
    pass


class ShardError(RuntimeError):
    """A shard run cannot go on (e.g. a resumed run whose input changed); the message says what to do."""


@dataclass(frozen=True)
class TarJob:
    """One input tar and what the worker needs to process it."""

    path: str
    folder_split: str | None  # the split subfolder it sits in, if any
    tokenizer: str | None
    source: str  # dataset name written into each sample's json
    need_source_split: bool  # the `source` rule: a sample without a known split is skipped
    record: str | None = None  # where its completion record goes (grr_data.shard_resume)
    items: tuple | None = None  # a chunk of a plain input instead of a tar: its PlainItems (grr_data.plain_input)


@dataclass
class Sample:
    key: str
    jpg: bytes | None  # None once written to the tar's `.jpgs` work file, or restored from a completion record
    caption: str
    ids: np.ndarray  # (65,) int64
    meta: dict
    identity: SampleIdentity
    member: str  # the image's member name in the input tar (a plain input: its file)
    resized: bool  # whether `jpg` is a re-encoding of that member
    stored: tuple[int, int] | None = None  # (offset, size) of `jpg` in the tar's `.jpgs` (grr_data.shard_resume)


@dataclass
class TarResult:
    samples: list[Sample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # samples, by reason
    damaged: bool = False  # the tar itself is damaged (what was lost is in `skipped`)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, tar/key, detail)
    num_truncated: int = 0
    num_resized: int = 0
    num_decoded: int = 0  # images decoded to get here (0 for a tar restored from its record)
    from_record: bool = False


@dataclass(frozen=True)
class ShardInputs:
    """What a run reads, in processing order: one unit per worker job (an input tar, or a chunk
    of a plain input)."""

    kind: str  # "tars", or a plain input's: "folder", "csv", "jsonl"
    units: list[tuple[str, str | None, tuple | None]]  # (tar path or chunk name, split subfolder, chunk items)
    fingerprint: list | dict  # kept in params.json: a changed input is not resumed

    @property
    def has_folders(self) -> bool:
        return self.units[0][1] is not None

    @property
    def plain(self) -> bool:
        return self.kind != "tars"

    @property
    def unit_name(self) -> str:
        return "tar" if self.kind == "tars" else "chunk"


def find_inputs(input_path: Path) -> ShardInputs:
    """The input tars of a fetch output, else the chunks of a plain input."""
    # plain_input builds on this module, so it is imported where it is needed
    from grr_data.plain_input import find_plain_inputs

    if input_path.is_file():
        plain = find_plain_inputs(input_path)
    elif not input_path.is_dir():
        raise InputError(f"{input_path}: no such file or folder; pass the folder `grr data fetch` wrote, a folder "
                         "of images with captions beside them, or a .csv/.jsonl list of path and caption")
    else:
        tars = _find_tars(input_path)
        if tars:
            return ShardInputs("tars", [(str(p), split, None) for p, split in tars],
                               [[str(p.relative_to(input_path)), p.stat().st_size, p.stat().st_mtime_ns]
                                for p, _ in tars])
        plain = find_plain_inputs(input_path)
        if plain is None:
            raise InputError(f"{input_path}: no .tar files (nor train/ val/ test/ subfolders holding them) and no "
                             f"images ({', '.join(IMAGE_EXTENSIONS)}) with captions beside them (name.txt); "
                             "expected `grr data fetch` output or a folder of captioned images")
    name = f"{input_path.resolve()}:chunk-"
    return ShardInputs(plain.kind, [(f"{name}{i:06d}", None, items) for i, items in enumerate(plain.chunks)],
                       plain.fingerprint)


def _find_tars(input_dir: Path) -> list[tuple[Path, str | None]]:
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


def prepare_image(data: bytes) -> tuple[bytes, tuple[int, int], bool]:
    """(JPEG bytes of the stored form, decoded upright size, whether it was re-encoded).

    Raises ValueError("truncated_image" | "corrupt_image" | "unusable_image", detail) when it does
    not decode fully or cannot be stored; the size limits are checked before decoding.
    """
    try:
        with warnings.catch_warnings():  # the size limit below says it once, as a skip reason
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        check_usable(image.size)
        image.load()
    except UnusableImage as err:
        raise ValueError("unusable_image", str(err)) from err
    except Image.DecompressionBombError as err:
        raise ValueError("unusable_image", str(err)) from err
    except Exception as err:  # PIL raises many types for bad data
        # PIL says this only when the data ended mid-image; garbage headers read as corrupt
        reason = "truncated_image" if "image file is truncated" in str(err) else "corrupt_image"
        raise ValueError(reason, f"{type(err).__name__}: {err}") from err
    if is_stored_form(image):
        return data, image.size, False
    try:
        jpg, size, _ = to_stored_jpeg(image)
    except Exception as err:  # an encoder failure belongs to this image, not to the run
        raise ValueError("unusable_image", f"cannot store it as JPEG: {type(err).__name__}: {err}") from err
    return jpg, size, True


def read_caption(data: bytes | None) -> str:
    """The caption of UTF-8 bytes; raises ValueError(reason, detail) for a bad one."""
    if data is None:
        raise ValueError("missing_caption", "no .txt member")
    try:
        caption = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError("invalid_utf8_caption", str(err)) from err
    caption = caption.strip()
    if not caption:
        raise ValueError("empty_caption", "caption is empty or whitespace")
    return caption


def _output_key(job: TarJob, key: str) -> str:
    prefix = f"{job.folder_split}_" if job.folder_split else ""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}{Path(job.path).stem}_{key}")


def process_tar(job: TarJob, images: BinaryIO | None = None) -> TarResult:
    """Validate, resize and tokenize every sample of one input tar, or of a plain input's chunk
    (runs in a worker). With `images` (a tar's `.jpgs` work file, grr_data.shard_resume), each stored
    JPEG is written there as soon as it is ready and its sample keeps only where (`Sample.stored`),
    so a worker holds one image at a time, not a whole tar's; a chunk's samples keep their bytes."""
    if job.items is not None:
        from grr_data.plain_input import process_chunk  # it builds on this module

        return process_chunk(job)
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
            pending.append((_output_key(job, key), jpg, caption, meta, identity, f"{key}.{image_ext}", resized))
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


def tokenize_pending(job: TarJob, result: TarResult, pending: list[tuple]) -> None:
    """Tokenize the captions of the samples read so far, all at once, and add them to `result`.
    `pending`: (key, jpg, caption, meta, identity, member, resized) per sample; `jpg` is the bytes, or
    (offset, size) in the `.jpgs` work file they were written to."""
    ids, truncated, invalid = load_tokenizer(job.tokenizer).encode_captions([p[2] for p in pending])
    for row, (key, jpg, caption, meta, identity, member, resized) in enumerate(pending):
        if invalid[row]:
            result.skipped["special_token_in_caption"] += 1
            result.problems.append(("special_token_in_caption", meta["source_key"],
                                    f"caption {caption[:80]!r} tokenizes to PAD or EOS"))
            continue
        meta["caption_truncated"] = bool(truncated[row])
        stored = jpg if isinstance(jpg, tuple) else None
        result.samples.append(Sample(key, None if stored else jpg, caption, ids[row], meta, identity, member, resized,
                                     stored))
        result.num_resized += resized
    result.num_truncated = int(truncated.sum())
