"""ROCO v2: images archives and caption CSVs per source split (train, valid, test), converted locally.

Default is the clean split (train -> train, valid -> val, test -> test). `paper_split` reproduces
the paper's 69,866 / 9,904: train = train + valid and val = valid, so every validation pair is also
a training pair; that is reported loudly and recorded in `fetch_manifest.json`. Each sample's json
keeps its `source_split`, so the overlap stays visible downstream.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from grr_data.fetch.archives import iter_archive
from grr_data.fetch.catalog import load_manifest
from grr_data.fetch.common import FetchError, FetchOptions, FetchReport, SplitCounts, describe_source
from grr_data.fetch.convert import PairWriter, SourceImage
from grr_data.infra.progress import progress

PAPER_SPLIT_WARNING = ("--paper-split: the paper's split puts ROCO's validation pairs inside its training "
                       "pairs (train = train + valid, val = valid); validation figures on it measure "
                       "fitting, not generalisation")


def _find(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        for base in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
            if (base / name).exists():
                return base / name
    return None


def read_captions(path: Path, columns: dict) -> dict[str, str]:
    """{ID: caption} from one ROCO captions CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {columns["id"], columns["caption"]} <= set(reader.fieldnames):
            raise FetchError(f"{path}: expected columns {columns['id']!r} and {columns['caption']!r}, "
                             f"found {reader.fieldnames}")
        captions = {}
        for line, row in enumerate(reader, start=2):
            image_id, caption = (row[columns["id"]] or "").strip(), (row[columns["caption"]] or "").strip()
            if not image_id:
                raise FetchError(f"{path}:{line}: empty {columns['id']}")
            captions[image_id] = caption
    return captions


def fetch(options: FetchOptions) -> dict:
    manifest = load_manifest("roco")
    spec = manifest["sources"]
    if options.source is None:
        raise FetchError(f"ROCO v2 is converted from its archives: download the images archives and the "
                         f"*_captions.csv of train, valid and test from {spec['record']} into one folder "
                         "and pass it with --from")
    folder = Path(options.source)
    if not folder.is_dir():
        raise FetchError(f"--from {folder}: not a folder; pass the folder holding the ROCO v2 archives and CSVs")
    out = Path(options.out)
    report = FetchReport("roco", options)
    mode = "paper" if options.paper_split else "clean"
    routing = manifest["splits"][mode]  # output split -> source splits
    if options.paper_split:
        print(f"WARNING: {PAPER_SPLIT_WARNING}", file=sys.stderr)
        report.warn(PAPER_SPLIT_WARNING)
    report.extra.update({"split_mode": mode, "source_splits": routing})

    sources = {}
    for split, files in spec["files"].items():
        csv_path, images = _find(folder, [files["captions"]]), _find(folder, files["images"])
        if csv_path is None or images is None:
            raise FetchError(f"{folder}: ROCO {split} needs {files['captions']} and one of "
                             f"{', '.join(files['images'])}; download them from {spec['record']}")
        sources[split] = (read_captions(csv_path, spec["csv_columns"]), images)
        report.sources += [describe_source(csv_path), describe_source(images)]
    report.source_counts = {s: SplitCounts(num_attempted=len(c)) for s, (c, _) in sources.items()}

    total = sum(len(sources[s][0]) for targets in routing.values() for s in targets)
    with progress(total=total, desc="pairs", unit="pair") as bar:
        writers = {split: PairWriter(out / split, options.shard_size, bar.update) for split in routing}
        for source_split, (captions, images) in sources.items():
            targets = [writers[out_split] for out_split, srcs in routing.items() if source_split in srcs]
            seen = set()
            for name, read in iter_archive(images):
                image_id = Path(name).stem
                if image_id not in captions or image_id in seen:
                    continue
                seen.add(image_id)
                image = SourceImage(image_id=image_id, captions=[captions[image_id]], source=f"{images.name}:{name}",
                                    read=read, extra={"source_split": source_split})
                for writer in targets:
                    writer.add(image)
            for image_id in sorted(set(captions) - seen):
                image = SourceImage(image_id=image_id, captions=[captions[image_id]], source=images.name, read=None,
                                    extra={"source_split": source_split},
                                    error=f"missing file: {image_id}.jpg not in {images.name}")
                for writer in targets:
                    writer.add(image)
        for writer in writers.values():
            writer.close()
    for split in routing:
        report.add_split(split, out / split)
    report.tool = {"name": "grr converter (Pillow)", "split_mode": mode}
    return report.finish()
