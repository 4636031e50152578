"""`grr data check`: verify a sharded set against its `manifest.json`.

Checks that every listed shard exists with the recorded sha256 and sample count, that its DALI
index matches the tar member by member, that every member's CRC32 is the one its checksum file
recorded (what the loaders verify per sample; sets sharded before checksums get a warning),
that each sample has all four members and a valid token layout, that no key is stored twice
and no image (sha256 of the stored JPEG) is in two splits, and that no shard on disk is
missing from the manifest. Shards are read and hashed by a pool of workers (`workers`, default
the usable cores); the checks across shards run in the main process in manifest order, so the
report is the same for any worker count. A set in an object store (`s3://`, `gs://`) is checked
the same way, each shard on a local copy (one per worker at a time, deleted after). The one allowed overlap is one the
manifest declares (`overlapping_splits`, from ROCO's paper split): it is reported as a warning
when exactly the declared number of images is shared, and as a problem otherwise.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from grr_data.format.layout import LAYOUT_VERSION, SEQ_LEN, SpecialIds, check_layout
from grr_data.format.manifest import MANIFEST, Manifest, ShardEntry
from grr_data.format.records import (
    EXTENSIONS,
    checksum_path,
    decode_ids,
    index_path,
    read_checksums,
    read_index,
)
from grr_data.infra import store
from grr_data.infra.files import sha256_file
from grr_data.infra.procs import make_pool, usable_cores
from grr_data.infra.progress import progress as progress_bar
from grr_data.infra.store import Location, StorePath, location
from grr_data.shard.split import pair_name

MAX_PROBLEMS_PER_SHARD = 20


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # expected findings, e.g. a declared overlap
    num_samples: dict[str, int] = field(default_factory=dict)
    num_shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _tar_samples(path: Path) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], dict[str, bytes],
                                      dict[str, str], list[dict[str, int]]]:
    """Per sample (key, {ext: (offset, size)}) in tar order, ids bytes and jpg sha256 by key, and
    per sample {ext: CRC32} (hashed as read: a 10k-sample shard's JPEGs are ~400 MB)."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    crcs: list[dict[str, int]] = []
    ids, jpg_hashes = {}, {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
                crcs.append({})
            samples[-1][1][ext] = (info.offset_data, info.size)
            data = tar.extractfile(info).read()
            crcs[-1][ext] = zlib.crc32(data)
            if ext == "ids":
                ids[key] = data
            elif ext == "jpg":
                jpg_hashes[key] = hashlib.sha256(data).hexdigest()
    return samples, ids, jpg_hashes, crcs


def _check_crcs(path: Path, samples: list, crcs: list[dict[str, int]], problem) -> None:
    """Each member's CRC32 against the shard's checksum file: what the loaders verify per sample."""
    crc_path = checksum_path(path)  # `path`: the local file or copy
    try:
        recorded = read_checksums(crc_path)
    except (OSError, ValueError) as err:
        problem(f"checksum file {crc_path.name} missing or unreadable ({err}); the loaders cannot verify "
                "this shard's samples: re-shard or restore it")
        return
    if len(recorded) != len(samples):
        problem(f"checksum file {crc_path.name} lists {len(recorded)} samples, the tar holds {len(samples)}")
        return
    for (key, _), found, row in zip(samples, crcs, recorded, strict=True):
        changed = [ext for col, ext in enumerate(EXTENSIONS) if ext in found and found[ext] != row[col]]
        if changed:
            problem(f"sample {key}: CRC32 of {', '.join('.' + e for e in changed)} differs from {crc_path.name} "
                    "(the bytes changed since sharding; the loaders skip this sample)")


def _check_shard(root: Location, special: SpecialIds, checksums: bool,
                 entry: ShardEntry) -> tuple[list[str], list[str], list[str]]:
    """Check one listed shard (in a worker); returns its problems, and its keys and image hashes
    for the checks across shards. A shard in a store is checked on a local copy (with its index and
    checksums), one shard per worker at a time, deleted after."""
    path = root / entry.path
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < MAX_PROBLEMS_PER_SHARD:
            problems.append(f"{path}: {text}")

    if not store.is_file(path):
        problem("missing (listed in manifest.json)")
        return problems, [], []
    with store.local_copy(path, (index_path(path), checksum_path(path))) as local:
        return _check_local_shard(local, special, checksums, entry, problems, problem)


def _check_local_shard(path: Path, special: SpecialIds, checksums: bool, entry: ShardEntry, problems: list[str],
                       problem) -> tuple[list[str], list[str], list[str]]:
    if sha256_file(path) != entry.sha256:
        problem("sha256 differs from manifest.json (the file changed or is damaged)")
    try:
        samples, ids, jpg_hashes, crcs = _tar_samples(path)
    except (tarfile.TarError, OSError, EOFError) as err:
        problem(f"unreadable tar ({err})")
        return problems, [], []
    if len(samples) != entry.num_samples:
        problem(f"holds {len(samples)} samples, manifest.json says {entry.num_samples}")
    idx = index_path(path)
    try:
        if [dict(members) for _, members in samples] != read_index(idx, keep_keys=False).entries():
            problem(f"index {idx.name} does not match the tar (offsets, sizes or members differ)")
    except (OSError, ValueError) as err:
        problem(f"index {idx.name} missing or unreadable ({err})")
    if checksums:
        _check_crcs(path, samples, crcs, problem)
    for key, members in samples:
        if sorted(members) != sorted(EXTENSIONS):
            problem(f"sample {key} has members {sorted(members)}, expected {sorted(EXTENSIONS)}")
        if key in ids:
            try:
                reason = check_layout(decode_ids(ids[key]).tolist(), special)
            except ValueError as err:
                reason = str(err)
            if reason is not None:
                problem(f"sample {key}: token ids {reason}")
    hashes = [jpg_hashes[key] for key, _ in samples if key in jpg_hashes]
    return problems, [key for key, _ in samples], hashes


def check_dataset(data_dir: str | os.PathLike | StorePath, progress: bool = True,
                  workers: int | None = None) -> CheckReport:
    """Check a sharded set (a folder, or a URL of a store); `workers` processes read and hash the
    shards (default: the usable cores), the report is the same for any number. A store that cannot
    be reached raises StoreError naming the URL and the endpoint."""
    root = location(data_dir)  # a URL is refused here, not reported as a set without a manifest
    report = CheckReport()
    try:
        manifest = Manifest.read(root, current_layout=False)
    except ValueError as err:
        report.problems.append(f"{err}; did the shard run finish?")
        return report
    manifest_path, special = manifest.path, manifest.special
    if special != SpecialIds.for_vocab(special.vocab_size):
        report.problems.append(f"{manifest_path}: special ids {special} do not follow the layout rule")
    if not manifest.is_current_layout:
        report.problems.append(f"{manifest_path}: layout version/seq_len {manifest.layout_version}/"
                               f"{manifest.seq_len}, this code reads {LAYOUT_VERSION}/{SEQ_LEN}")
    for name, split in manifest.splits.items():
        listed = sum(e.num_samples for e in split.shards)
        if listed != split.num_samples:
            report.problems.append(f"{manifest_path}: split {name} says {split.num_samples} samples, "
                                   f"its shards list {listed}")
    _find_unlisted(root, manifest, report)
    if not manifest.sample_checksums:
        report.warnings.append(f"{manifest_path}: sharded before per-sample checksums: the shards' sha256 are "
                               "checked here, but the loaders check only token ids per sample; re-shard to have "
                               "every sample verified when it is read")

    across = _AcrossShards(root, dict(manifest.overlapping_splits))
    entries = [(name, entry) for name, split in manifest.splits.items() for entry in split.shards]
    workers = max(1, min(workers if workers is not None else usable_cores(), len(entries)))
    # workers read and hash the shards; the checks across shards run here, in manifest order, so
    # the report is the same for any worker count
    with make_pool(partial(_check_shard, root, special, manifest.sample_checksums), workers) as pool:
        results = pool.imap([entry for _, entry in entries])
        for (name, entry), (problems, keys, hashes) in progress_bar(zip(entries, results, strict=True),
                                                                    total=len(entries), desc="check", unit="shard",
                                                                    disable=not progress):
            report.problems += problems
            across.add(name, entry, keys, hashes, report)
    _compare_overlaps(manifest, across.declared, across.shared, report)
    return report


class _AcrossShards:
    """The checks across shards: no key stored twice, no image (stored JPEG sha256) in two splits
    but for a declared overlap, whose shared images are collected."""

    def __init__(self, root: Location, declared: dict):
        self.root, self.declared = root, declared
        self.owner_of_key: dict[str, str] = {}
        self.owner_of_image: dict[str, tuple[str, str]] = {}  # image sha256 -> (split, shard path)
        self.reported_images: set[str] = set()
        self.shared: dict[str, set[str]] = {pair: set() for pair in declared}  # declared pair -> image sha256s in both

    def add(self, name: str, entry: ShardEntry, keys: list[str], hashes: list[str], report: CheckReport) -> None:
        report.num_samples[name] = report.num_samples.get(name, 0) + len(keys)
        report.num_shards += 1
        for key in keys:
            if key in self.owner_of_key:
                report.problems.append(f"{self.root / entry.path}: key {key} is stored twice "
                                       f"({self.owner_of_key[key]} and {name})")
            self.owner_of_key[key] = name
        for digest in hashes:
            other_split, other_path = self.owner_of_image.setdefault(digest, (name, entry.path))
            if other_split != name and pair_name(other_split, name) in self.declared:
                self.shared[pair_name(other_split, name)].add(digest)
            elif other_split != name and digest not in self.reported_images:
                self.reported_images.add(digest)
                report.problems.append(f"{self.root / entry.path}: image {digest[:16]} is in splits "
                                       f"{other_split} ({other_path}) and {name}")


def _find_unlisted(root: Location, manifest: Manifest, report: CheckReport) -> None:
    """Shard-like files anywhere under the set that the manifest does not list: a stray split
    folder, a half-written `*.tmp` of a killed run, an index without its tar."""
    listed = {root / e.path for split in manifest.splits.values() for e in split.shards}
    listed |= {index_path(p) for p in listed} | {checksum_path(p) for p in listed}
    for path in store.list_files(root):
        if path not in listed and path.name != MANIFEST \
                and (path.suffix in (".tar", ".idx", ".crc") or ".tmp" in path.name or path.parent != root):
            report.problems.append(f"{path}: on disk but not listed in manifest.json (left over from another "
                                   "or an interrupted run?); delete it or re-shard")


def _compare_overlaps(manifest: Manifest, declared: dict, shared: dict[str, set[str]],
                      report: CheckReport) -> None:
    found = Counter({pair: len(digests) for pair, digests in shared.items()})
    for pair, count in declared.items():
        if found[pair] != count:
            report.problems.append(f"{manifest.path}: declares {count} images shared by {pair}, the shards share "
                                   f"{found[pair]}; the overlap is not the one the shard run recorded")
        else:
            report.warnings.append(f"{pair}: {count} images are in both splits, as declared (split_mode "
                                   f"{manifest.split_mode!r}): validation on this set measures fitting, "
                                   "not generalisation")
