"""MSCOCO 2017 captions: the official train/val split (default) or the Karpathy split, one sample per
caption, all captions of an image sharing its `image_id`.

`--split karpathy` (with `--karpathy dataset_coco.json`) regroups the same 123,287 images into the
train / val / test split of Karpathy & Fei-Fei (2015): 113,287 / 5,000 / 5,000 images ("restval" goes to
train), the split the image-text retrieval literature reports on. It takes only the split from the
Karpathy file, matched by COCO image id; captions, images and URLs come from the 2017 annotations as
for the official split (the 2014 and 2017 releases hold the same images and captions).

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

from grr_data.fetch.common import (
    FETCH_MANIFEST,
    FetchError,
    FetchOptions,
    FetchReport,
    SplitCounts,
    describe_source,
    source_or_download,
)
from grr_data.fetch.convert import PairWriter, SourceImage
from grr_data.fetch.flickr30k import find_karpathy
from grr_data.fetch.staged import fetch_staged
from grr_data.infra.progress import progress

SPLITS = ("train", "val")
SPLIT_CHOICES = ("official", "karpathy")
KARPATHY_NAME = "dataset_coco.json"


def check_options(options: FetchOptions) -> None:
    """Refuse an unknown --split, and a folder already fetched with the other split."""
    split = options.split or "official"
    if split not in SPLIT_CHOICES:
        raise FetchError(f"--split {split}: mscoco's splits are {' and '.join(SPLIT_CHOICES)}")
    done = Path(options.out) / FETCH_MANIFEST
    if done.exists():
        made = json.loads(done.read_text(encoding="utf-8")).get("split", "official")
        if made != split:
            raise FetchError(f"{options.out} holds mscoco with the {made} split; fetch the {split} split "
                             "into another --out folder")


def read_karpathy_splits(path: Path) -> dict[str, str]:
    """{COCO image id: train | val | test} from Karpathy's dataset_coco.json (restval counts as train)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        splits = {str(im["cocoid"]): "train" if im["split"] == "restval" else im["split"] for im in data["images"]}
    except json.JSONDecodeError as err:
        raise FetchError(f"{path}: not valid JSON ({err})") from err
    except (KeyError, TypeError) as err:
        raise FetchError(f"{path}: not Karpathy's dataset_coco.json (missing {err})") from err
    odd = sorted(set(splits.values()) - {"train", "val", "test"})
    if odd:
        raise FetchError(f"{path}: unknown split name(s) {', '.join(odd)}; expected train, restval, val, test")
    return splits


def karpathy_regroup(images: dict[str, list[dict]], splits: dict[str, str], where: Path) -> dict[str, list[dict]]:
    """The 2017 images regrouped by the Karpathy split; each keeps its 2017 folder in "folder"."""
    by_id = {im["image_id"]: im for split in SPLITS for im in images[split]}
    missing = sorted(set(splits) - set(by_id), key=int)
    if missing:
        raise FetchError(f"{where}: {len(missing)} image id(s) of the Karpathy split have no captions in the "
                         f"2017 annotations (first: {missing[0]}); pass the matching dataset_coco.json")
    regrouped = {"train": [], "val": [], "test": []}
    for image_id in sorted(splits, key=int):
        im = by_id[image_id]
        regrouped[splits[image_id]].append({**im, "folder": im["source_split"], "source_split": splits[image_id]})
    return regrouped


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
    with progress(total=total, desc="pairs", unit="pair") as bar:
        for split, split_images in images.items():
            writer = PairWriter(out / split, options.shard_size, bar.update)
            for im in split_images:
                path = folders[im.get("folder", split)] / im["file_name"]
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
    if options.split == "karpathy":
        karpathy = find_karpathy(source, options.karpathy, KARPATHY_NAME)
        report.sources.append(describe_source(karpathy))
        images = karpathy_regroup(images, read_karpathy_splits(karpathy), karpathy)
        report.manifest = {**report.manifest, **report.manifest["karpathy_split"]}  # its expected counts, rule
        report.source_counts = {s: SplitCounts(num_attempted=len(ims)) for s, ims in images.items()}
        report.count_unit = "images"
    elif options.karpathy is not None:
        raise FetchError("--karpathy is for mscoco with --split karpathy (or flickr30k)")
    report.extra["split"] = options.split or "official"
    folders = {split: source / f"{split}2017" for split in SPLITS} if source.is_dir() else {}
    if folders and all(f.is_dir() for f in folders.values()):
        _convert_local(images, folders, options, report)
    else:
        rows = [im for split_images in images.values() for im in split_images]
        fetch_staged(rows, options, report, source_id=json.dumps([s.get("sha256") for s in report.sources]))
    return report.finish()
