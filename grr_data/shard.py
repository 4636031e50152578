"""`grr data shard`: fetch output -> tokenized, split shards and `manifest.json` (CONTRACTS.md).

The input is fetch output (img2dataset tars), or a user's own images: a folder with captions
beside them, or a CSV/JSONL list (grr_data.plain_input), read in fixed-size chunks of sorted
paths that stand in for input tars everywhere below.

Input tars are processed in sorted order (in parallel, results merged in order); a single
`SplitAssigner` decides each sample's split, and each split is cut into shards of `shard_size`
samples in input order. So the output is the same for any worker count.

One run at a time: the run holds `OUT/.grr.lock` (grr_data.lock) from start to end, so a second
`grr data shard` into the same --out fails at once naming the first.

Resume rule: the arguments of a run are kept in `OUT/.work/params.json`. Each processed input
tar leaves a completion record in `OUT/.work/tars/` (grr_data.shard_resume), so a rerun with the
same arguments decodes only the tars without one. It rebuilds the same plan, keeps every shard
whose tar and index both exist and whose index lists exactly the keys planned for it (a tar
appears only on a clean close, its index last) and rewrites the others. `manifest.json` is written
last, atomically: it means complete.

A fetch output whose `fetch_manifest.json` says `"split_mode": "paper"` (ROCO's paper split)
deliberately puts the same images in train and val; under `--split source` those copies are kept,
declared in manifest.json (`split_mode`, `overlapping_splits`) and warned about.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from grr_data.files import write_json_atomic
from grr_data.layout import LAYOUT_VERSION, SEQ_LEN
from grr_data.lock import LOCK_NAME, hold_lock
from grr_data.plain_input import PlainImages
from grr_data.procs import WorkerPool
from grr_data.records import (
    SAMPLE_CHECKSUMS,
    ShardWriter,
    checksum_path,
    index_path,
    read_checksums,
    read_index,
    sample_members,
    sha256_file,
)
from grr_data.shard_input import FOLDER_ORDER, InputError, ShardError, TarJob, TarResult, find_inputs
from grr_data.shard_resume import InputImages, record_path, run_job
from grr_data.skips import SkipLog
from grr_data.split import SplitAssigner, SplitRule, declared_overlaps
from grr_data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
WORK_DIR = ".work"


def _indexed_keys(tar: Path) -> list[str] | None:
    """The sample keys a complete shard's index lists, or None when tar, checksums or index is
    missing or unreadable, or the tar's size is not the one its index implies (then it is rewritten)."""
    idx, crc = index_path(tar), checksum_path(tar)
    if not (tar.is_file() and idx.is_file() and crc.is_file()):
        return None
    try:
        table = read_index(idx)
        if len(read_checksums(crc)) != len(table):
            return None
    except (OSError, ValueError):
        return None
    if tar.stat().st_size != table.tar_size():
        return None
    return table.keys


class _SplitSink:
    """Cuts one split's samples into shards, keeping shards a killed run already completed."""

    def __init__(self, out_dir: Path, split: str, shard_size: int, on_shard: Callable[[Path], None] | None):
        self.dir, self.split, self.shard_size, self.on_shard = out_dir / split, split, shard_size, on_shard
        self.num_samples = 0
        self.shards: list[dict] = []
        self.num_kept = 0
        self._writer: ShardWriter | None = None
        self._path: Path | None = None
        self._keys: list[str] = []

    def add(self, key: str, make_members: Callable[[], dict[str, bytes]]) -> None:
        """Plan `key` next; `make_members()` is called only when its shard is still to be written."""
        if self.num_samples % self.shard_size == 0:
            self.finish_shard()
            self._path = self.dir / f"shard-{self.num_samples // self.shard_size:06d}.tar"
            # the plan is deterministic, so a complete shard on disk holds exactly these samples
            self._writer = None if _indexed_keys(self._path) is not None else ShardWriter(self._path)
        self._keys.append(key)
        if self._writer is not None:
            self._writer.write(key, make_members())
        self.num_samples += 1

    def finish_shard(self) -> None:
        if self._path is None:
            return
        if self._writer is not None:
            self._writer.close()
        elif _indexed_keys(self._path) != self._keys:
            raise ShardError(f"{self._path}: an existing shard does not hold the samples planned for it; "
                               "the input changed since the interrupted run; delete the output folder")
        else:
            self.num_kept += 1
        self.shards.append({"path": f"{self.split}/{self._path.name}", "num_samples": len(self._keys)})
        if self.on_shard is not None:
            self.on_shard(self._path)
        self._writer, self._path, self._keys = None, None, []

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def _results(jobs: list[TarJob], workers: int) -> Iterator[TarResult]:
    """run_job over the jobs, in order; at most 2 x workers tars in flight to bound memory.

    Pool workers leave SIGTERM and SIGINT to this process and die with it (grr_data.procs); when
    this generator stops early (an error, Ctrl-C) they are killed rather than waited for."""
    if workers <= 1:
        yield from map(run_job, jobs)
        return
    # workers tokenize one tar each; Rust threads inside them would only contend for the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with WorkerPool(run_job, workers, depth=2) as pool:
        yield from pool.imap(jobs)


def _read_fetch_manifest(input_dir: Path) -> dict | None:
    candidates = [input_dir / "fetch_manifest.json"] + sorted(input_dir.glob("*/fetch_manifest.json"))
    found = {}
    for path in candidates:
        if path.is_file():
            try:
                found[path.parent.name if path.parent != input_dir else ""] = json.loads(path.read_text())
            except ValueError as err:
                raise InputError(f"{path}: not valid JSON ({err}); fix or remove it") from err
    if "" in found:
        return found[""]
    return found or None


def shard_dataset(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str | None = None,
    tokenizer: str | None = None,
    shard_size: int = 10_000,
    workers: int | None = None,
    progress: bool = True,
    on_shard: Callable[[Path], None] | None = None,
    break_lock: bool = False,
) -> tuple[dict, dict]:
    """Shard `input_dir` (fetch output, a folder of captioned images, or a .csv/.jsonl list: see
    grr_data.plain_input) into `out_dir`; returns (manifest, run stats: seconds, kept shards).

    `split` None means `source` when the input has split subfolders, else 95/5.
    `on_shard(path)` is called after each shard is complete on disk.
    The run holds `out_dir`'s lock throughout (grr_data.lock): a second run into the same folder
    fails at once naming this one; `break_lock` takes over a lock left by a run on another host."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        with hold_lock(out_dir, "grr data shard", break_lock):
            return _shard_dataset(input_dir, out_dir, split, tokenizer, shard_size, workers, progress, on_shard)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a run that failed before writing anything leaves no folder behind
        raise


def _shard_dataset(input_dir, out_dir, split, tokenizer, shard_size, workers, progress, on_shard):
    started = time.time()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    inputs = find_inputs(input_dir)
    has_folders = inputs.has_folders
    rule = SplitRule.parse(split or ("source" if has_folders else "95/5"))
    if rule.source and inputs.plain:
        raise InputError(f"{input_dir}: --split source needs fetch output with source splits; images with "
                         "captions (a folder, CSV or JSONL) have none: use --split 95/5 (the default) or 90/5/5")
    tok = load_tokenizer(tokenizer)
    fetch_manifest = _read_fetch_manifest(input_dir)
    overlaps = declared_overlaps(fetch_manifest)
    if overlaps and not rule.source:
        log.warning("%s was fetched with the paper split (overlapping %s); --split %s re-splits it by image "
                    "hash, so the overlap is not kept", input_dir, ", ".join(sorted(overlaps)), split)
    elif overlaps:
        log.warning("PAPER SPLIT: %s declares overlapping splits %s (split_mode paper); images in both are "
                    "kept in both, so validation on this set measures fitting, not generalisation",
                    input_dir, ", ".join(sorted(overlaps)))
    source = str((fetch_manifest or {}).get("dataset") or (fetch_manifest or {}).get("name") or input_dir.name)

    if (out_dir / MANIFEST).exists():
        raise FileExistsError(f"{out_dir} already holds a complete sharded set ({MANIFEST}); "
                              "choose another --out or delete it")
    params = {"input": str(input_dir.resolve()), "split_rule": rule.describe(), "tokenizer": tok.name,
              "tokenizer_sha256": tok.fingerprint["files_sha256"],
              "shard_size": shard_size, "layout_version": LAYOUT_VERSION,
              # size and mtime: a refetched tar of the same size must not reuse a stale record
              "inputs": inputs.fingerprint}
    work = out_dir / WORK_DIR
    params_path = work / "params.json"
    if params_path.is_file():
        if json.loads(params_path.read_text()) != params:
            raise FileExistsError(f"{out_dir}: an interrupted run with other arguments or input is here "
                                  f"({params_path}); rerun it with the same arguments or delete the folder")
        log.warning("resuming the interrupted run in %s", out_dir)
        # half-written shards, checksums and indexes of the killed run, and its manifest if it was
        # killed while writing it (grr_data.files' temporary name)
        for stale in [*out_dir.glob("*/*.tmp"), *out_dir.glob(f".{MANIFEST}.tmp-*")]:
            stale.unlink()
    elif any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty and not an interrupted `grr data shard` run; "
                              "choose an empty or new --out")
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(params_path, params, indent=1, ensure_ascii=True)

    jobs = [TarJob(path, folder, tokenizer, source, rule.source, str(record_path(work, i)), items)
            for i, (path, folder, items) in enumerate(inputs.units)]
    sinks = {name: _SplitSink(out_dir, name, shard_size, on_shard) for name in rule.splits}
    assigner = SplitAssigner(rule, overlaps)
    images = PlainImages() if inputs.plain else InputImages()
    num_decoded = num_reused = 0
    skipped: Counter = Counter()
    problem_log = SkipLog(log)
    num_truncated = num_resized = num_damaged = 0
    if has_folders:
        log.info("reading the split folders in the order %s (not train first): an image in two splits "
                 "stays in the evaluation one", ", ".join(FOLDER_ORDER))
    bar = tqdm(total=len(jobs), unit=inputs.unit_name, desc="shard", disable=not progress)
    results = _results(jobs, workers if workers is not None else (os.cpu_count() or 1))
    try:
        for job, result in zip(jobs, results, strict=True):
            num_decoded += result.num_decoded
            num_reused += result.from_record
            skipped.update(result.skipped)
            num_damaged += result.damaged
            for problem in result.problems:
                problem_log.add(*problem)
            num_truncated += result.num_truncated
            num_resized += result.num_resized
            for sample in result.samples:
                name = assigner.assign(sample.identity)
                if name is None:
                    skipped["duplicate_across_splits"] += 1
                    problem_log.add("duplicate_across_splits", sample.meta["source_key"],
                                f"the same image is already in another split (source split "
                                f"{sample.identity.source_split}, image id {sample.identity.image_id})")
                    continue
                sinks[name].add(sample.key, lambda job=job, sample=sample, name=name: sample_members(
                    images.jpg(job.path, sample), sample.caption, sample.ids, dict(sample.meta, split=name)))
            bar.update(1)
            bar.set_postfix({n: s.num_samples for n, s in sinks.items()} | {"skipped": sum(skipped.values())})
        for sink in sinks.values():
            sink.finish_shard()
    except BaseException:
        results.close()  # stops the pool now, not when the generator is collected
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        bar.close()

    shards = [shard for sink in sinks.values() for shard in sink.shards]
    for shard in tqdm(shards, desc="sha256", unit="shard", disable=not progress):
        shard["sha256"] = sha256_file(out_dir / shard["path"])
    manifest = {
        "layout_version": LAYOUT_VERSION,
        "seq_len": SEQ_LEN,
        # every shard has a `.crc` file beside it; the loaders verify each sample they read
        "sample_checksums": SAMPLE_CHECKSUMS,
        # name, vocabulary, special ids, and its files' sha256 and library version: a different
        # tokenizer of the same size is told apart (`CaptionTokenizer.record`)
        "tokenizer": tok.record(),
        # a test split appears under the `source` rule only when the source has one
        "splits": {name: {"num_samples": sink.num_samples, "shards": sink.shards} for name, sink in sinks.items()
                   if not rule.source or name != "test" or sink.num_samples},
        "skipped": dict(sorted(skipped.items())),  # samples, by reason
        "damaged_tars": num_damaged,  # input tars cut or garbled (their lost samples are in `skipped`)
        "truncated_captions": num_truncated,
        "duplicate_images": assigner.num_duplicate_images,
        "resized_images": num_resized,
        "shard_size": shard_size,
        "fetch_manifest": fetch_manifest,
        "split_rule": rule.describe(),
    }
    if assigner.allowed_overlaps:
        manifest["split_mode"] = fetch_manifest["split_mode"]
        # images stored in both splits of each pair; `grr data check` expects exactly these
        manifest["overlapping_splits"] = {pair: assigner.overlaps[pair] for pair in sorted(assigner.allowed_overlaps)}
    write_json_atomic(out_dir / MANIFEST, manifest, indent=1, ensure_ascii=True)
    shutil.rmtree(work, ignore_errors=True)
    stats = {"seconds": round(time.time() - started, 1), "kept_shards": sum(s.num_kept for s in sinks.values()),
             "reused_tars": num_reused, "decoded_images": num_decoded + images.num_decoded}
    return manifest, stats
