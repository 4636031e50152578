"""A user's own images as `grr data shard` input, without img2dataset: a folder of images with a
caption beside each (`name.jpg|jpeg|png|webp` + `name.txt`, searched recursively), or a list file
(a `.csv` with a `path,caption` header, or a `.jsonl` of `{"path": ..., "caption": ...}` lines;
paths relative to the list's folder or absolute).

The main process only lists (names, sizes, times; never image bytes) and cuts the listing, in
sorted path order (a list: its line order), into chunks of `CHUNK_SIZE` samples. A chunk plays the
role of an input tar: one worker job (`TarJob.items`), one completion record, one resume unit,
so worker counts and resume behave as they do for tars. Listing problems (an image without its
caption, a caption without its image, a bad list line, a caption that is not UTF-8) travel in
the chunk and are counted as bad samples by the worker, like a corrupt image.

A list file is read as UTF-8 with each byte that is not UTF-8 kept aside (`surrogateescape`), so
one bad row of a scraped list is one skipped sample (`invalid_utf8_caption`, or `bad_line` when
it is the path), not a refused file. A file that is not UTF-8 text at all is refused whole: one
holding a NUL byte (binary, or UTF-16 as some spreadsheets save), or one where most rows are not
UTF-8 (another encoding: skipping them would drop most of the data).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

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
from grr_data.shard.split import SampleIdentity

log = logging.getLogger(__name__)

# samples per chunk: big enough that a worker's start-up cost vanishes, small enough that a killed
# run loses little and two workers share a small folder
CHUNK_SIZE = 1000
LIST_SUFFIXES = (".csv", ".jsonl")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a byte that was not UTF-8 (surrogateescape), or a lone surrogate
_KEY_STEM_CHARS = 40  # the file name part of a sample key (the key is the index of a tar member)


class PlainItem(NamedTuple):
    """One listed sample: an image and its caption, or the listing problem that makes it a bad one."""

    key: str  # output sample key, unique in the set
    name: str  # where it is, in messages and `source_key`: `sub/name.jpg`, or `list.csv:12`
    image: str | None  # the image file
    caption_file: str | None  # the caption's .txt (folder input)
    caption: str | None  # the caption itself (list input)
    problem: tuple[str, str] | None = None  # (skip reason, detail)


class PlainInputs(NamedTuple):
    kind: PlainInput
    chunks: list[tuple[PlainItem, ...]]
    fingerprint: dict  # kept in params.json: a changed input is not resumed


def find_plain_inputs(path: Path) -> PlainInputs | None:
    """The chunks of a list file, or of a folder of captioned images (None: the folder has neither
    an image nor a caption)."""
    if path.is_file():
        if path.suffix.lower() not in LIST_SUFFIXES:
            raise InputError(f"{path}: not a .csv or .jsonl list; pass a folder of images with captions "
                             "beside them, a .csv with a path,caption header, or a .jsonl of path/caption objects")
        kind = path.suffix.lower()[1:]
        items = _list_csv(path) if kind == "csv" else _list_jsonl(path)
    else:
        kind, items = "folder", _list_folder(path)
        if not items:
            return None
    usable = [item for item in items if item.problem is None]
    if not usable:
        first = items[0] if items else None
        why = f" ({first.name}: {first.problem[1]})" if first else ""
        raise InputError(f"{path}: no usable sample{why}; each sample needs an image and a caption")
    chunks = [tuple(items[i : i + CHUNK_SIZE]) for i in range(0, len(items), CHUNK_SIZE)]
    log.info("%s: %d samples listed (%d of them skipped: no image, no caption or a bad line), in %d chunks "
             "of up to %d", path, len(items), len(items) - len(usable), len(chunks), CHUNK_SIZE)
    fingerprint = {"kind": kind, "chunk_size": CHUNK_SIZE,
                   "chunks": [[len(chunk), _chunk_digest(chunk)] for chunk in chunks]}
    return PlainInputs(PlainInput(kind), chunks, fingerprint)


def _key(number: int, name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(name).stem)[:_KEY_STEM_CHARS]
    return f"{number:08d}_{stem}"


def _list_folder(root: Path) -> list[PlainItem]:
    """Images and captions under `root`, paired by name in each folder, in sorted path order.
    Hidden files and folders are left out (`._name.jpg` is macOS metadata, not a picture)."""
    found = []  # (relative path parts, image, caption file, problem)
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        images, captions = [], {}
        for name in names:
            stem, dot, ext = name.rpartition(".")
            if name.startswith(".") or not dot:
                continue
            if ext.lower() in IMAGE_EXTENSIONS:
                images.append((stem, name))
            elif ext.lower() == "txt":
                captions[stem] = name
        rel = Path(folder).relative_to(root)
        paired = set()
        for stem, name in images:
            caption = captions.get(stem)
            paired.add(stem)
            problem = None if caption else ("missing_caption", f"no {stem}.txt beside it")
            found.append(((rel / name).parts, os.path.join(folder, name),
                          caption and os.path.join(folder, caption), problem))
        for stem, name in captions.items():
            if stem not in paired:
                found.append(((rel / name).parts, None, os.path.join(folder, name),
                              ("missing_image", f"no image named {stem}.{'|'.join(IMAGE_EXTENSIONS)} beside it")))
    found.sort(key=lambda f: f[0])
    return [PlainItem(_key(n, parts[-1]), "/".join(parts), image, caption_file, None, problem)
            for n, (parts, image, caption_file, problem) in enumerate(found)]


def _list_item(list_path: Path, number: int, line: int, image: str, caption: str) -> PlainItem:
    name = f"{list_path.name}:{line}"
    if _SURROGATE.search(image):
        return PlainItem(_key(number, "line"), name, None, None, None,
                         ("bad_line", f"its path is not UTF-8 ({_not_utf8(image)})"))
    if not image.strip():
        return PlainItem(_key(number, "line"), name, None, None, None, ("bad_line", "its path is empty"))
    if _SURROGATE.search(caption):  # the reason and detail a tar's caption gets (samples.read_caption)
        return PlainItem(_key(number, image), name, None, None, None, ("invalid_utf8_caption", _not_utf8(caption)))
    return PlainItem(_key(number, image), name, str(list_path.parent / image), None, caption)


def _not_utf8(text: str) -> str:
    """What UTF-8 says about the bytes of `text`, read with errors="surrogateescape"."""
    try:
        text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError as err:
        return str(err)
    return "not UTF-8"


def _list_text(path: Path, data: bytes) -> str:
    """A list file's text, bytes that are not UTF-8 kept as lone surrogates (their rows are skipped);
    a NUL byte means the file is not text at all."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputError(f"{path}: not UTF-8 text (a NUL byte at byte {nul}: a binary file, or UTF-16); "
                         "save it as UTF-8")
    return data.decode("utf-8-sig", errors="surrogateescape")  # -sig: a spreadsheet's byte-order mark


def _check_mostly_text(path: Path, data: bytes, items: list[PlainItem], num_not_utf8: int) -> None:
    """Refuse a list most of whose rows are not UTF-8 (a file in another encoding); name the few."""
    if not num_not_utf8:
        return
    try:
        data.decode("utf-8-sig")
        start = "?"
    except UnicodeDecodeError as err:
        start = err.start
    if 2 * num_not_utf8 > len(items):
        raise InputError(f"{path}: not UTF-8 text (byte {start}); save it as UTF-8 ({num_not_utf8} of its "
                         f"{len(items)} rows are not UTF-8)")
    log.warning("%s: %d of %d rows are not UTF-8 (the first at byte %s) and are skipped; if the file is in "
                "another encoding, save it as UTF-8", path, num_not_utf8, len(items), start)


def _bad_line(list_path: Path, number: int, line: int, detail: str) -> PlainItem:
    return PlainItem(_key(number, "line"), f"{list_path.name}:{line}", None, None, None, ("bad_line", detail))


def _list_csv(path: Path) -> list[PlainItem]:
    data = path.read_bytes()
    # newline="": lines end only at \n, \r, \r\n (str.splitlines would also cut a caption at \u2028)
    reader = csv.DictReader(io.StringIO(_list_text(path, data), newline=""))
    num_not_utf8 = 0
    try:
        header = reader.fieldnames or []
        if "path" not in header or "caption" not in header:
            found = ", ".join(map(repr, header)) or "nothing"
            raise InputError(f"{path}: its first line must be a header naming the columns `path` and `caption` "
                             f"(found {found}); name them so, or add that line first")
        items, line = [], reader.line_num + 1
        for row in reader:
            number = len(items)
            if row["caption"] is None:
                items.append(_bad_line(path, number, line, "no caption field"))
            else:
                items.append(_list_item(path, number, line, row["path"], row["caption"]))
                num_not_utf8 += bool(_SURROGATE.search(row["path"] + row["caption"]))
            line = reader.line_num + 1  # a quoted caption may span lines: a row starts after the last
    except csv.Error as err:
        raise InputError(f"{path}:{reader.line_num}: not valid CSV ({err}); fix that line") from err
    _check_mostly_text(path, data, items, num_not_utf8)
    return items


def _list_jsonl(path: Path) -> list[PlainItem]:
    data = path.read_bytes()
    items, num_not_utf8 = [], 0
    # one JSON value a line: lines end at \n only (JSON text holds no raw line breaks)
    for line, text in enumerate(_list_text(path, data).split("\n"), start=1):
        if not text.strip():
            continue
        number = len(items)
        num_not_utf8 += bool(_SURROGATE.search(text))
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            items.append(_bad_line(path, number, line, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("path", "caption"))):
            items.append(_bad_line(path, number, line, 'not an object with strings "path" and "caption"'))
            continue
        items.append(_list_item(path, number, line, row["path"], row["caption"]))
    _check_mostly_text(path, data, items, num_not_utf8)
    return items


def _stat(path: str | None) -> list[int] | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if st else None


def _chunk_digest(chunk: tuple[PlainItem, ...]) -> str:
    """What a resumed run must find unchanged: every item, and its files' sizes and times."""
    digest = hashlib.sha256()
    for item in chunk:
        digest.update(json.dumps([*item, _stat(item.image), _stat(item.caption_file)]).encode())
    return digest.hexdigest()


def _read(path: str, reason: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(reason, f"cannot read {path}: {err.strerror or err}") from err


def process_chunk(job: TarJob) -> TarResult:
    """Validate, resize and tokenize one chunk's samples (runs in a worker; the chunk's `TarJob.items`)."""
    result = TarResult()
    pending = []
    for item in job.items:
        try:
            if item.problem is not None:
                raise ValueError(*item.problem)
            caption = read_caption(_read(item.caption_file, "missing_caption") if item.caption is None
                                   else item.caption.encode())
            raw = _read(item.image, "missing_image")
            result.num_decoded += 1
            jpg, size, resized = prepare_image(raw)
        except ValueError as err:
            result.skipped[err.args[0]] += 1
            result.problems.append((err.args[0], item.name, err.args[1]))
            continue
        digest = hashlib.sha256(raw).digest()
        meta = {"source": job.source, "source_key": item.name, "image_sha256": digest.hex(),
                "original_size": list(size)}
        # no source image id: the image bytes decide the split, so the captions of one image stay together
        pending.append((item.key, jpg, caption, meta, SampleIdentity(digest), item.image, resized))
    tokenize_pending(job, result, pending)
    return result


@dataclass(frozen=True)
class PlainInput:
    """The `InputKind` (grr_data.shard.samples) of a user's own images: a folder, a CSV or a JSONL list."""

    name: str  # "folder", "csv" or "jsonl"
    unit_name: str = "chunk"
    has_source_splits: bool = False  # a user's images carry no dataset split

    def process(self, job: TarJob, images: BinaryIO | None = None) -> TarResult:
        return process_chunk(job)  # a chunk's samples keep their bytes; workfiles stores them

    def read_back(self, unit_path: str, sample: Sample) -> tuple[bytes, str]:
        """(The image file's bytes, b"" when it is gone; the file)."""
        try:
            return Path(sample.member).read_bytes(), sample.member
        except OSError:
            return b"", sample.member
