"""Fetch each image once with img2dataset, then write one sample per caption into the split folders.

For sources with several captions per image (mscoco, the sample), downloading an image once per
caption would multiply the traffic; instead img2dataset fetches each image once into
`OUT/_work/download/` with its captions as a JSON column, and the pairs are written from there
without re-encoding. The staging folder is removed once `fetch_manifest.json` is written (see `grr_data.fetch.fetch`).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

from grr_data.fetch.common import WORK_DIR, FetchOptions, FetchReport, complete_shards
from grr_data.fetch.convert import PairWriter, SourceImage
from grr_data.fetch.img2ds import run_img2dataset, write_url_list
from grr_data.infra.progress import progress

STAGED_COLUMNS = ["image_id", "source_split", "captions"]


def url_list_columns(images: list[dict]) -> dict[str, list]:
    """Parquet columns for img2dataset from dicts with url, image_id, source_split, captions."""
    return {
        "url": [im["url"] for im in images],
        "caption": [im["captions"][0] for im in images],
        "image_id": [str(im["image_id"]) for im in images],
        "source_split": [im["source_split"] for im in images],
        "captions": [json.dumps(im["captions"], ensure_ascii=False) for im in images],
    }


def iter_downloaded(folder: Path, columns: list[str]):
    """An img2dataset output folder in key order: (meta, jpg bytes) for each fetched sample from the tars,
    then (row, None) for each failed one from the parquets (`columns` of it: key, url, status,
    error_message and the extra columns).

    img2dataset writes a shard's samples in the order its download threads finish; its keys follow
    the URL list. Reading in key order makes a rerun of the same fetch write the same pairs in the
    same order (and so the same shards, and the same demo results under one seed).
    """
    for tar_path in complete_shards(folder):
        with tarfile.open(tar_path) as tar:
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for info in tar:
                if info.isfile():
                    key, _, ext = info.name.rpartition("/")[2].partition(".")
                    members.setdefault(key, {})[ext] = info
            for key in sorted(members):
                meta = json.loads(tar.extractfile(members[key]["json"]).read())
                yield meta, tar.extractfile(members[key]["jpg"]).read()
        rows = pq.read_table(tar_path.with_suffix(".parquet"),
                             columns=["key", "url", "status", "error_message", *columns]).to_pylist()
        for row in sorted(rows, key=lambda r: r["key"]):
            if row["status"] != "success":
                yield row, None


def final_info(meta: dict) -> dict:
    """What PairWriter needs of an image img2dataset already resized and encoded."""
    return {k: meta[k] for k in ("width", "height", "original_width", "original_height", "sha256")}


def _staged_images(staging: Path):
    """SourceImages from the staging folder in key order (see `iter_downloaded`)."""
    for meta, jpg in iter_downloaded(staging, STAGED_COLUMNS):
        common = {"image_id": meta["image_id"], "captions": json.loads(meta["captions"]), "source": meta["url"],
                  "extra": {"source_split": meta["source_split"]}}
        if jpg is None:
            yield SourceImage(**common, read=None, error=meta["error_message"] or "unknown error")
        else:
            yield SourceImage(**common, read=lambda jpg=jpg: jpg, final=final_info(meta))


def fetch_staged(images: list[dict], options: FetchOptions, report: FetchReport, source_id: str,
                 split_of: dict[str, str] | None = None) -> None:
    """Fetch `images` (url, image_id, source_split, captions) and write OUT/<split>/ pairs.

    `split_of` maps a source split to its output folder (default: the same name).
    """
    out = Path(options.out)
    work = out / WORK_DIR
    staging = work / "download"
    url_list = write_url_list(work / "urls.parquet", url_list_columns(images), source_id)
    report.tool = run_img2dataset(url_list, staging, options, len(images), extra_columns=STAGED_COLUMNS)
    splits = sorted({split_of.get(im["source_split"], im["source_split"]) if split_of else im["source_split"]
                     for im in images})
    total = sum(len(im["captions"]) for im in images)
    with progress(total=total, desc="pairs", unit="pair") as bar:
        writers = {s: PairWriter(out / s, options.shard_size, bar.update) for s in splits}
        for image in _staged_images(staging):
            split = image.extra["source_split"]
            writers[split_of.get(split, split) if split_of else split].add(image)
        for writer in writers.values():
            writer.close()
    for split in splits:
        report.add_split(split, out / split)

