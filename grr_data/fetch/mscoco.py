"""MSCOCO 2017 captions: the official train/val split, one sample per caption, all captions of an image
sharing its `image_id`.

A sample is one (image, caption) pair because the paper counts pairs (591,753 / 25,014) and the losses
are per pair; the shared `image_id` lets later steps keep an image's captions together. Images come
from local `train2017/` and `val2017/` folders beside the annotations when present, else each image
is fetched once from its `coco_url` with img2dataset (see `staged`).
"""

from __future__ import annotations

import json
import zipfile
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from grr_data.fetch.common import (
    FetchError,
    FetchOptions,
    FetchReport,
    describe_source,
    source_or_download,
)
from grr_data.fetch.convert import PairWriter, SourceImage
from grr_data.fetch.staged import fetch_staged

SPLITS = ("train", "val")


def _annotation_name(split: str) -> str:
    return f"captions_{split}2017.json"


def read_annotations(source: Path) -> dict[str, tuple[dict, str]]:
    """{split: (parsed captions JSON, where it came from)} from a folder or the annotations zip."""
    found = {}
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = {Path(n).name: n for n in zf.namelist()}
            for split in SPLITS:
                member = names.get(_annotation_name(split))
                if member is not None:
                    found[split] = (json.loads(zf.read(member)), f"{source}:{member}")
    elif source.is_dir():
        for split in SPLITS:
            for folder in (source, source / "annotations"):
                path = folder / _annotation_name(split)
                if path.is_file():
                    try:
                        found[split] = (json.loads(path.read_text(encoding="utf-8")), str(path))
                    except json.JSONDecodeError as err:
                        raise FetchError(f"{path}: not valid JSON ({err})") from err
                    break
    else:
        raise FetchError(f"--from {source}: neither a folder nor the annotations zip")
    missing = [_annotation_name(s) for s in SPLITS if s not in found]
    if missing:
        raise FetchError(f"{source}: {', '.join(missing)} not found; pass the folder or zip holding the "
                         "2017 caption annotations (annotations_trainval2017.zip from cocodataset.org)")
    return found


def images_with_captions(data: dict, where: str, split: str) -> list[dict]:
    """One dict per image that has captions: image_id, file_name, url, source_split, captions."""
    try:
        captions = defaultdict(list)
        for ann in sorted(data["annotations"], key=lambda a: a["id"]):
            captions[ann["image_id"]].append(ann["caption"].strip())
        return [{"image_id": str(im["id"]), "file_name": im["file_name"], "url": im["coco_url"],
                 "source_split": split, "captions": captions[im["id"]]}
                for im in sorted(data["images"], key=lambda im: im["id"]) if captions[im["id"]]]
    except (KeyError, TypeError) as err:
        raise FetchError(f"{where}: not a COCO captions file (missing {err})") from err


def _convert_local(images: dict[str, list[dict]], folders: dict[str, Path], options: FetchOptions,
                   report: FetchReport) -> None:
    out = Path(options.out)
    total = sum(len(im["captions"]) for split in images.values() for im in split)
    with tqdm(total=total, desc="pairs", unit="pair") as bar:
        for split, split_images in images.items():
            writer = PairWriter(out / split, options.shard_size, bar.update)
            for im in split_images:
                path = folders[split] / im["file_name"]
                writer.add(SourceImage(image_id=im["image_id"], captions=im["captions"], source=str(path),
                                       read=path.read_bytes, extra={"source_split": split}))
            writer.close()
            report.add_split(split, out / split)
    report.tool = {"name": "grr converter (Pillow)", "source": "local image folders"}


def fetch(options: FetchOptions) -> dict:
    report = FetchReport("mscoco", options)
    source = source_or_download(
        options, report.manifest["sources"]["annotations"]["url"],
        "the folder holding captions_train2017.json and captions_val2017.json (and optionally train2017/, "
        "val2017/), or annotations_trainval2017.zip", folder_ok=True)
    annotations = read_annotations(source)
    images = {}
    if source.is_file():
        report.sources.append(describe_source(source))
    for split, (data, where) in annotations.items():
        if source.is_dir():
            report.sources.append(describe_source(where))
        images[split] = images_with_captions(data, where, split)
    folders = {split: source / f"{split}2017" for split in SPLITS} if source.is_dir() else {}
    if folders and all(f.is_dir() for f in folders.values()):
        _convert_local(images, folders, options, report)
    else:
        rows = [im for split in SPLITS for im in images[split]]
        fetch_staged(rows, options, report, source_id=json.dumps([s.get("sha256") for s in report.sources]))
    return report.finish()
