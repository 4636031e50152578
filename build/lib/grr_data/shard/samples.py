"""What every input of `grr data shard` turns into, and the per-sample work they share: the
worker's job for one input unit (`TarJob`: an img2dataset tar, or a chunk of a user's own images),
its validated, tokenized `Sample`s and the unit's `TarResult`; decoding an image into its stored
form (`prepare_image`), reading a caption, tokenizing; and `InputKind`, what an input kind
(grr_data.shard.tars, grr_data.shard.plain) provides to the run. Every image is fully decoded,
since a truncated JPEG is only caught that way; an image whose shorter side is not 288 (or that
is not an upright RGB/greyscale JPEG) is resized and re-encoded (grr_data.format.image).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image

from grr_data.format.image import UnusableImage, check_usable, decode, is_stored_form, open_image, store
from grr_data.shard.split import SampleIdentity
from grr_data.tokenizer import load_tokenizer

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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
    record: str | None = None  # where its completion record goes (grr_data.shard.workfiles)
    items: tuple | None = None  # a chunk of a plain input instead of a tar: its PlainItems (grr_data.shard.plain)


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
    stored: tuple[int, int] | None = None  # (offset, size) of `jpg` in the tar's `.jpgs` (grr_data.shard.workfiles)


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


class InputKind(Protocol):
    """One kind of input (img2dataset tars, a folder, a CSV or JSONL list), chosen once per run by
    grr_data.shard.inputs.find_inputs and handed to the workers."""

    name: str  # "tars", "folder", "csv" or "jsonl"
    unit_name: str  # what one worker job reads: "tar" or "chunk"
    has_source_splits: bool  # whether samples can carry their dataset's own split (`--split source`)

    def process(self, job: TarJob, images: BinaryIO | None = None) -> TarResult:
        """Validate, resize and tokenize every sample of one unit (runs in a worker). With `images`
        (the unit's `.jpgs` work file, grr_data.shard.workfiles), a stored JPEG may be written there
        as soon as it is ready and its sample keep only where (`Sample.stored`)."""
        ...

    def read_back(self, unit_path: str, sample: Sample) -> bytes:
        """The raw image bytes of a sample restored from a completion record, read from the input
        again (b"" when it is gone); grr_data.shard.workfiles.InputImages checks and re-prepares them."""
        ...


def prepare_image(data: bytes) -> tuple[bytes, tuple[int, int], bool]:
    """(JPEG bytes of the stored form, decoded upright size, whether it was re-encoded).

    Raises ValueError("truncated_image" | "corrupt_image" | "unusable_image", detail) when it does
    not decode fully or cannot be stored; the size limits are checked before decoding, and a large
    image is decoded within grr_data.format.image's memory bound.
    """
    try:
        image = open_image(data)
        check_usable(image.size)
        as_is = is_stored_form(image)
        decoded = decode(image)
    except UnusableImage as err:
        raise ValueError("unusable_image", str(err)) from err
    except Image.DecompressionBombError as err:
        raise ValueError("unusable_image", str(err)) from err
    except Exception as err:  # PIL raises many types for bad data
        # PIL says this only when the data ended mid-image; garbage headers read as corrupt
        reason = "truncated_image" if "image file is truncated" in str(err) else "corrupt_image"
        raise ValueError(reason, f"{type(err).__name__}: {err}") from err
    if as_is:
        return data, image.size, False
    try:
        jpg, size, _ = store(decoded)
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
