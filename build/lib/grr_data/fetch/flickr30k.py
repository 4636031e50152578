"""Flickr30K with the Karpathy split (29,000 / 1,014 / 1,000 images, five captions each), converted locally.

The images are not URL-fetchable: they come from the images archive (zip or tar) or folder given
with `--from`; the split and captions from `dataset_flickr30k.json` (`--karpathy`, or found beside
the archive or inside the folder). One sample per caption; an image's captions share its `image_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

from grr_data.fetch.archives import iter_archive
from grr_data.fetch.common import FetchError, FetchOptions, FetchReport, SplitCounts, describe_source
from grr_data.fetch.convert import PairWriter, SourceImage
from grr_data.infra.progress import progress

KARPATHY_NAME = "dataset_flickr30k.json"


def find_karpathy(source: Path, given: Path | None, name: str = KARPATHY_NAME) -> Path:
    """`--karpathy` when given, else `name` inside the `source` folder or beside it (flickr30k, mscoco)."""
    if given is not None:
        if not Path(given).is_file():
            raise FetchError(f"--karpathy {given}: no such file; pass {name}")
        return Path(given)
    candidates = [source / name] if source.is_dir() else []
    candidates.append(source.parent / name)
    for path in candidates:
        if path.is_file():
            return path
    raise FetchError(f"{name} not found (looked at {', '.join(map(str, candidates))}); pass it with "
                     "--karpathy (it is in caption_datasets.zip from Karpathy's deepimagesent page)")


def read_karpathy(path: Path) -> dict[str, dict]:
    """{file name: {"split", "captions"}} from the Karpathy split JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {}
        for im in data["images"]:
            split = "train" if im["split"] == "restval" else im["split"]
            images[im["filename"]] = {"split": split, "captions": [s["raw"].strip() for s in im["sentences"]]}
    except json.JSONDecodeError as err:
        raise FetchError(f"{path}: not valid JSON ({err})") from err
    except (KeyError, TypeError) as err:
        raise FetchError(f"{path}: not a Karpathy split file (missing {err})") from err
    return images


def fetch(options: FetchOptions) -> dict:
    if options.source is None:
        raise FetchError("Flickr30K images are not URL-fetchable: pass the images archive (zip or tar) or "
                         f"folder with --from, and {KARPATHY_NAME} with --karpathy (or beside it)")
    source = Path(options.source)
    if not source.exists():
        raise FetchError(f"--from {source}: no such file or folder; pass the Flickr30K images archive or folder")
    karpathy = find_karpathy(source, options.karpathy)
    images = read_karpathy(karpathy)
    out = Path(options.out)
    report = FetchReport("flickr30k", options)
    report.sources += [describe_source(source), describe_source(karpathy)]
    splits = sorted({im["split"] for im in images.values()})
    report.source_counts = {s: SplitCounts(num_attempted=sum(im["split"] == s for im in images.values()))
                            for s in splits}
    report.count_unit = "images"

    total = sum(len(im["captions"]) for im in images.values())
    with progress(total=total, desc="pairs", unit="pair") as bar:
        writers = {s: PairWriter(out / s, options.shard_size, bar.update) for s in splits}
        seen = set()
        for name, read in iter_archive(source):
            info = images.get(name)
            if info is None or name in seen:
                continue
            seen.add(name)
            writers[info["split"]].add(SourceImage(image_id=Path(name).stem, captions=info["captions"],
                                                   source=name, read=read, extra={"source_split": info["split"]}))
        for name in sorted(set(images) - seen):
            info = images[name]
            writers[info["split"]].add(SourceImage(image_id=Path(name).stem, captions=info["captions"], source=name,
                                                   read=None, extra={"source_split": info["split"]},
                                                   error=f"missing file: {name} not in {source.name}"))
        for writer in writers.values():
            writer.close()
    for split in splits:
        report.add_split(split, out / split)
    report.tool = {"name": "grr converter (Pillow)"}
    return report.finish()
