"""`grr data shard`: fetch output -> tokenized, split shards and `manifest.json` (CONTRACTS.md).

The input is fetch output (img2dataset tars), or a user's own images: a folder with captions
beside them, or a CSV/JSONL list (grr_data.shard.plain), read in fixed-size chunks of sorted
paths that stand in for input tars everywhere below.

The work is done by a pool of workers, in two kinds of jobs. First each input tar: decode,
resize and tokenize it, write its samples to work files (grr_data.shard.workfiles) and hand back
only a summary of what the split decision reads. Then each output shard: a worker writes it
from those work files and hashes it (grr_data.shard.write). The main process never holds image
bytes: it takes the summaries in input order, decides every sample's split with one
`SplitAssigner`, and cuts each split into shards of `shard_size` samples in input order. So the
output is the same for any worker count, whichever worker writes a shard. Its CPU per sample is
a few microseconds (benchmarks/shard_scaling.py), and its memory does not grow with the input
but for the SplitAssigner's maps (~100 bytes per distinct image).

One run at a time: the run holds `OUT/.grr.lock` (grr_data.infra.lock) from start to end, so a second
`grr data shard` into the same --out fails at once naming the first.

An --out in an object store (`s3://bucket/prefix/set`, `gs://...`: grr_data.infra.store) gets the
same bytes: each shard is written into the run's local work folder and uploaded (tar, checksums,
index), `manifest.json` last. The work folder (`.work/` below) then stays on this node, in
`store.node_cache("shard", URL)` (`~/.cache/grr/shard/HASH-NAME/.work`, or under $GRR_CACHE_DIR), so
an interrupted run resumes when rerun on the same node; the lock is the object `OUT/.grr.lock` plus
a local lock on that folder (grr_data.infra.lock.hold_store_lock says what it cannot guard against).

Resume rule: the arguments of a run are kept in `OUT/.work/params.json`. Each processed input
tar leaves a completion record in `OUT/.work/tars/` (grr_data.shard.workfiles), so a rerun with the
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
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

from grr_data.format.layout import LAYOUT_VERSION
from grr_data.format.manifest import MANIFEST, Manifest, write_manifest
from grr_data.infra import store
from grr_data.infra.files import write_json_atomic
from grr_data.infra.lock import LOCK_NAME, hold_lock, hold_store_lock
from grr_data.infra.procs import make_pool, usable_cores
from grr_data.infra.progress import progress as progress_bar
from grr_data.infra.skips import SkipLog
from grr_data.infra.store import Location, local_folder, location
from grr_data.shard.inputs import find_inputs
from grr_data.shard.samples import InputError, TarJob
from grr_data.shard.split import SampleIdentity, SplitAssigner, SplitRule, declared_overlaps
from grr_data.shard.tars import FOLDER_ORDER
from grr_data.shard.workfiles import TarSummary, images_path, record_path
from grr_data.shard.write import ShardDone, ShardJob, ShardWork
from grr_data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
WORK_DIR = ".work"


class _SplitSink:
    """One split's plan, in the main process and from metadata alone: cuts the split's samples, in
    input order, into shards of `shard_size`; each becomes a `ShardJob` a worker writes.
    `finish_shard()` records the shards the workers have completed (manifest entries, `on_shard`)."""

    def __init__(self, out_dir: Location, split: str, shard_size: int, on_shard: Callable[[Location], None] | None,
                 refs: Counter):
        self.dir, self.split, self.shard_size, self.on_shard = out_dir / split, split, shard_size, on_shard
        self.num_samples = 0
        self.shards: list[dict] = []  # manifest entries of completed shards (sorted by number at the end)
        self.num_kept = 0
        self.completed: list[ShardDone] = []  # reported by workers, not yet recorded
        self._refs = refs  # per input unit: planned shards holding its samples, not yet written
        self._entries: list[tuple[int, list[int]]] = []

    def add(self, unit: int, position: int) -> ShardJob | None:
        """Plan sample `position` of input unit `unit` next; returns the shard it completes, if any."""
        if self._entries and self._entries[-1][0] == unit:
            self._entries[-1][1].append(position)
        else:
            self._entries.append((unit, [position]))
            self._refs[unit] += 1
        self.num_samples += 1
        return self.cut() if self.num_samples % self.shard_size == 0 else None

    def cut(self) -> ShardJob | None:
        """The shard planned so far (the split's last one may be short); None when there is none."""
        if not self._entries:
            return None
        number = (self.num_samples - 1) // self.shard_size
        job = ShardJob(self.split, number, str(self.dir / f"shard-{number:06d}.tar"),
                       tuple((unit, tuple(positions)) for unit, positions in self._entries))
        self._entries = []
        return job

    def finish_shard(self) -> None:
        """Record the shards completed since the last call; each is whole on disk."""
        for done in self.completed:
            self.shards.append({"path": f"{self.split}/shard-{done.number:06d}.tar", "num_samples": done.num_samples,
                                "sha256": done.sha256})
            self.num_kept += done.kept
            if self.on_shard is not None:
                self.on_shard(self.dir / f"shard-{done.number:06d}.tar")
        self.completed = []


class _Plan:
    """The main loop of a run: hands input units, then the shards planned from their summaries, to
    the pool; decides splits in input order (one `SplitAssigner`), so the shards' contents do not
    depend on the worker count or on which result comes back first.

    Memory: summaries of at most `window` units ahead of the next one in order, the open shard of
    each split (unit and position per sample) and the SplitAssigner's maps; no image bytes."""

    def __init__(self, units: list[TarJob], sinks: dict[str, _SplitSink], assigner: SplitAssigner,
                 refs: Counter, problem_log: SkipLog):
        self.units, self.sinks, self.assigner, self.refs, self.problem_log = units, sinks, assigner, refs, problem_log
        self.totals = Counter()  # decoded, reused, damaged, truncated, resized, redecoded
        self.skipped: Counter = Counter()
        self._consumed = 0

    def run(self, pool, window: int, bar) -> None:
        ready: deque[ShardJob] = deque()
        arrived: dict[int, TarSummary] = {}
        next_unit = 0
        while True:
            while pool.num_idle and (ready or next_unit < min(len(self.units), self._consumed + window)):
                if ready:
                    job = ready.popleft()
                    pool.submit(job, job)
                else:
                    pool.submit(self.units[next_unit], next_unit)
                    next_unit += 1
            if not pool.num_busy:
                return
            tag, value = pool.next_done()
            if isinstance(tag, ShardJob):
                self._written(tag, value)
                continue
            arrived[tag] = value
            while self._consumed in arrived:
                unit = self._consumed
                ready.extend(self._consume(unit, arrived.pop(unit)))
                self._consumed += 1
                self._release([unit])
                bar.update(1)
                bar.set_postfix({n: s.num_samples for n, s in self.sinks.items()} | {"skipped": sum(self.skipped.values())})
            if self._consumed == len(self.units):
                ready.extend(job for sink in self.sinks.values() if (job := sink.cut()) is not None)

    def _consume(self, unit: int, summary: TarSummary) -> list[ShardJob]:
        totals = self.totals
        totals["decoded"] += summary.num_decoded
        totals["reused"] += summary.from_record
        totals["damaged"] += summary.damaged
        totals["truncated"] += summary.num_truncated
        totals["resized"] += summary.num_resized
        self.skipped.update(summary.skipped)
        for problem in summary.problems:
            self.problem_log.add(*problem)
        jobs = []
        for position, (identity, source_key) in enumerate(zip(summary.identities, summary.source_keys, strict=True)):
            name = self.assigner.assign(SampleIdentity(*identity))
            if name is None:
                self.skipped["duplicate_across_splits"] += 1
                self.problem_log.add("duplicate_across_splits", source_key,
                                     f"the same image is already in another split (source split {identity[2]}, "
                                     f"image id {identity[1]})")
                continue
            if (job := self.sinks[name].add(unit, position)) is not None:
                jobs.append(job)
        return jobs

    def _written(self, job: ShardJob, done: ShardDone) -> None:
        self.totals["redecoded"] += done.num_decoded
        sink = self.sinks[job.split]
        sink.completed.append(done)
        sink.finish_shard()
        for unit, _ in job.entries:
            self.refs[unit] -= 1
        self._release([unit for unit, _ in job.entries])

    def _release(self, units: list[int]) -> None:
        """Delete the `.jpgs` of units fully planned whose shards are all written (disk: bounded
        by the open shards, not by the input)."""
        for unit in units:
            if unit < self._consumed and self.refs[unit] <= 0:
                images_path(self.units[unit].record).unlink(missing_ok=True)


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
) -> tuple[Manifest, dict]:
    """Shard `input_dir` (fetch output, a folder of captioned images, or a .csv/.jsonl list: see
    grr_data.shard.plain) into `out_dir`; returns (manifest, run stats: seconds, kept shards).

    `split` None means `source` when the input has split subfolders, else 95/5.
    `on_shard(path)` is called after each shard is complete on disk.
    The run holds `out_dir`'s lock throughout (grr_data.infra.lock): a second run into the same folder
    fails at once naming this one; `break_lock` takes over a lock left by a run on another host."""
    input_dir, out_dir = local_folder(input_dir, "--input"), location(out_dir, "--out")
    args = (split, tokenizer, shard_size, workers, progress, on_shard)
    if store.is_remote(out_dir):
        # a bucket has no folder for the run's private work: it stays on this node
        work_root = store.node_cache("shard", out_dir)
        try:
            with hold_lock(work_root, "grr data shard", break_lock), \
                    hold_store_lock(out_dir, "grr data shard", break_lock):
                return _shard_dataset(input_dir, out_dir, work_root / WORK_DIR, *args)
        finally:
            if work_root.is_dir() and not any(work_root.iterdir()):
                work_root.rmdir()
    created = not out_dir.exists()
    try:
        with hold_lock(out_dir, "grr data shard", break_lock):
            return _shard_dataset(input_dir, out_dir, out_dir / WORK_DIR, *args)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a run that failed before writing anything leaves no folder behind
        raise


def _stale_files(out_dir: Location, staging: Path | None) -> list[Path]:
    """Half-written shards, checksums and indexes of a killed run, and its manifest if it was killed
    while writing it (grr_data.infra.files' temporary name). In a store an upload appears whole or
    not at all: only the local staging folder can hold half-written files."""
    if staging is not None:
        return list(staging.glob("*/*.tmp"))
    return [*out_dir.glob("*/*.tmp"), *out_dir.glob(f".{MANIFEST}.tmp-*")]


def _shard_dataset(input_dir, out_dir, work, split, tokenizer, shard_size, workers, progress, on_shard):
    started = time.time()
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    inputs = find_inputs(input_dir)
    has_folders = inputs.has_folders
    rule = SplitRule.parse(split or ("source" if has_folders else "95/5"))
    if rule.source and not inputs.kind.has_source_splits:
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

    if Manifest.exists(out_dir):
        raise FileExistsError(f"{out_dir} already holds a complete sharded set ({MANIFEST}); "
                              "choose another --out or delete it")
    params = {"input": str(input_dir.resolve()), "split_rule": rule.describe(), "tokenizer": tok.name,
              "tokenizer_sha256": tok.fingerprint["files_sha256"],
              "shard_size": shard_size, "layout_version": LAYOUT_VERSION,
              # size and mtime: a refetched tar of the same size must not reuse a stale record
              "inputs": inputs.fingerprint}
    # shards bound for a store are written in the work folder first, then uploaded
    staging = work / "staging" if store.is_remote(out_dir) else None
    params_path = work / "params.json"
    if params_path.is_file():
        if json.loads(params_path.read_text()) != params:
            raise FileExistsError(f"{out_dir}: an interrupted run with other arguments or input is here "
                                  f"({params_path}); rerun it with the same arguments or delete the folder")
        log.warning("resuming the interrupted run in %s", out_dir)
        for stale in _stale_files(out_dir, staging):
            stale.unlink()
    elif any(p.name != LOCK_NAME for p in (store.list_files(out_dir) if staging else out_dir.iterdir())):
        elsewhere = f" (an interrupted run's work folder stays on the node that ran it: {work})" if staging else ""
        raise FileExistsError(f"{out_dir}: not empty and not an interrupted `grr data shard` run{elsewhere}; "
                              "choose an empty or new --out")
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(params_path, params, indent=1, ensure_ascii=True)

    jobs = [TarJob(path, folder, tokenizer, source, rule.source, str(record_path(work, i)), items)
            for i, (path, folder, items) in enumerate(inputs.units)]
    refs: Counter = Counter()
    sinks = {name: _SplitSink(out_dir, name, shard_size, on_shard, refs) for name in rule.splits}
    assigner = SplitAssigner(rule, overlaps)
    plan = _Plan(jobs, sinks, assigner, refs, SkipLog(log))
    if has_folders:
        log.info("reading the split folders in the order %s (not train first): an image in two splits "
                 "stays in the evaluation one", ", ".join(FOLDER_ORDER))
    workers = workers if workers is not None else usable_cores()
    if workers > 1:
        # workers tokenize one tar each; Rust threads inside them would only contend for the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    bar = progress_bar(total=len(jobs), unit=inputs.kind.unit_name, desc="shard", disable=not progress)
    try:
        # pool workers leave SIGTERM and SIGINT to this process and die with it (grr_data.infra.procs)
        with make_pool(ShardWork(jobs, inputs.kind, staging), workers) as pool:
            plan.run(pool, 2 * workers, bar)
    except BaseException:
        # the pool's workers were killed: drop what they were writing (an inline writer drops its own)
        for stale in (staging or out_dir).glob("*/*.tmp"):
            stale.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    for sink in sinks.values():
        sink.shards.sort(key=lambda entry: int(Path(entry["path"]).stem.removeprefix("shard-")))
    totals, skipped = plan.totals, plan.skipped

    overlaps = {pair: assigner.overlaps[pair] for pair in sorted(assigner.allowed_overlaps)}
    manifest = write_manifest(
        out_dir, tokenizer=tok.record(),
        # a test split appears under the `source` rule only when the source has one
        splits={name: {"num_samples": sink.num_samples, "shards": sink.shards} for name, sink in sinks.items()
                if not rule.source or name != "test" or sink.num_samples},
        counts={"skipped": skipped, "damaged_tars": totals["damaged"], "truncated_captions": totals["truncated"],
                "duplicate_images": assigner.num_duplicate_images, "resized_images": totals["resized"]},
        shard_size=shard_size, fetch_manifest=fetch_manifest, split_rule=rule.describe(),
        split_mode=(fetch_manifest or {}).get("split_mode"), overlapping_splits=overlaps)
    shutil.rmtree(work, ignore_errors=True)
    stats = {"seconds": round(time.time() - started, 1), "kept_shards": sum(s.num_kept for s in sinks.values()),
             "reused_tars": totals["reused"], "decoded_images": totals["decoded"] + totals["redecoded"]}
    return manifest, stats
