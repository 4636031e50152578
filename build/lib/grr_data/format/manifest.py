"""A sharded set's `manifest.json`: its one schema, read and written here only.

`grr data shard` writes it through `write_manifest` (last, atomically, so a reader never sees a
half-written set); everything else learns what a set holds from `Manifest.read(data_dir)`: its
splits and their shards, the tokenizer it was made with and its special ids, whether every shard
has per-sample checksums, and whether its splits overlap on purpose (ROCO's paper split). A
command reads a set once and passes the `Manifest` down (loaders, training, evaluation, checks).

A `Manifest` is also a read-only mapping of the document as written (`manifest["skipped"]`), for
the counts that reports print and nothing reads.

The set's folder may be a URL of an object store (`s3://`, `gs://`): the manifest is read and
written through grr_data.infra.store, the same calls for both.

Every problem reading it is one ValueError naming the file and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from grr_data.format.layout import LAYOUT_VERSION, SEQ_LEN, SpecialIds
from grr_data.format.records import SAMPLE_CHECKSUMS
from grr_data.infra import store
from grr_data.infra.store import Location, StorePath, location

MANIFEST = "manifest.json"


class ManifestNotFound(ValueError, FileNotFoundError):
    """No manifest.json: not a sharded set, or its shard run has not finished."""


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the set's folder
    num_samples: int
    sha256: str | None


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: tuple[ShardEntry, ...]


@dataclass(frozen=True)
class TokenizerRecord:
    """The tokenizer a set was made with: a name `grr_data.tokenizer.load_tokenizer` accepts, its
    special ids, and the manifest's whole entry (which may also fingerprint the tokenizer)."""

    name: str
    special: SpecialIds
    entry: Mapping[str, object]

    @property
    def vocab_size(self) -> int:
        return self.special.vocab_size

    def to_dict(self) -> dict:
        """The manifest's entry as it stands, which runs record in their config and checkpoints."""
        return json.loads(json.dumps(dict(self.entry)))  # a deep copy: the caller may change it


@dataclass(frozen=True, eq=False)
class Manifest(Mapping):
    root: Location  # the set's folder: a local Path, or a StorePath (s3://, gs://: grr_data.infra.store)
    tokenizer: TokenizerRecord
    splits: Mapping[str, SplitInfo]  # in the manifest's order
    split_mode: str | None  # "paper" for ROCO's paper split, else None
    overlapping_splits: Mapping[str, int]  # "train/val" -> images stored in both, declared on purpose
    sample_checksums: bool  # every shard has a `.crc` file (sets sharded before them have none)
    layout_version: int | None
    seq_len: int | None
    document: Mapping[str, object]  # the whole document, read-only

    @property
    def path(self) -> Location:
        return self.root / MANIFEST

    @property
    def special(self) -> SpecialIds:
        return self.tokenizer.special

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: split.num_samples for name, split in self.splits.items()}

    @property
    def is_current_layout(self) -> bool:
        return self.layout_version == LAYOUT_VERSION and self.seq_len == SEQ_LEN

    def num_samples(self, split: str) -> int:
        """Samples in `split`; a ValueError naming the splits the set has when it lacks one."""
        return self.split(split).num_samples

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(f"{self.path}: no split {name!r}; the set has {', '.join(self.splits) or 'none'}")
        return self.splits[name]

    # the document as a read-only mapping
    def __getitem__(self, key: str):
        return self.document[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.document)

    def __len__(self) -> int:
        return len(self.document)

    @staticmethod
    def exists(data_dir: str | os.PathLike | StorePath) -> bool:
        """Whether `data_dir` holds a manifest (a finished `grr data shard`)."""
        return store.is_file(location(data_dir) / MANIFEST)

    @classmethod
    def of(cls, data: Manifest | str | os.PathLike | StorePath) -> Manifest:
        """`data` itself when it is a Manifest already, else the manifest of the set in that folder."""
        return data if isinstance(data, Manifest) else cls.read(data)

    @classmethod
    def read(cls, data_dir: str | os.PathLike | StorePath, current_layout: bool = True) -> Manifest:
        """The set's manifest (a folder, or a URL of a store); with `current_layout` a set of another
        token layout is refused (`grr data check` reads it anyway, to report that beside everything
        else). A store that cannot be reached is a StoreError naming the URL and the endpoint."""
        root = location(data_dir)
        path = root / MANIFEST
        hint = f"is {root} a sharded set (grr data shard)?"
        if not store.is_file(path):
            raise ManifestNotFound(f"{path} not found: {hint}")
        try:
            manifest = cls._parse(root, json.loads(store.read_text(path)))
        except store.StoreError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            reason = f"missing {err}" if isinstance(err, KeyError) else (str(err).splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path}: cannot read the set's manifest ({reason}); {hint}") from err
        if current_layout and not manifest.is_current_layout:
            raise ValueError(f"{path}: layout_version {manifest.layout_version}, seq_len {manifest.seq_len}; "
                             f"this grr reads {LAYOUT_VERSION}/{SEQ_LEN}: re-shard the set")
        return manifest

    @classmethod
    def _parse(cls, root: Location, raw: dict) -> Manifest:
        tok = raw["tokenizer"]
        special = SpecialIds(pad=int(tok["pad"]), eos=int(tok["eos"]), bos=int(tok["bos"]), cls=int(tok["cls"]),
                             vocab_size=int(tok["vocab_size"]))
        if not isinstance(raw["splits"], dict):
            raise TypeError("splits is not a mapping")
        splits = {}
        for name, split in raw["splits"].items():
            shards = split.get("shards") if isinstance(split, dict) else None
            if not isinstance(shards, list):
                raise TypeError(f"split {name!r} has no list of shards")
            for i, entry in enumerate(shards):
                if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                        and isinstance(entry.get("num_samples"), int)):
                    raise TypeError(f"split {name!r} shard #{i} has no path or num_samples: {entry!r}")
            splits[str(name)] = SplitInfo(
                num_samples=int(split["num_samples"]),
                shards=tuple(ShardEntry(s["path"], s["num_samples"], s.get("sha256")) for s in shards))
        checksums = raw.get("sample_checksums")
        if checksums not in (None, SAMPLE_CHECKSUMS):
            raise ValueError(f"sample_checksums {checksums!r}, this grr reads {SAMPLE_CHECKSUMS!r}: update grr or "
                             "re-shard the set")
        overlaps = {str(pair): int(count) for pair, count in (raw.get("overlapping_splits") or {}).items()}
        return cls(root=root, tokenizer=TokenizerRecord(str(tok["name"]), special, MappingProxyType(dict(tok))),
                   splits=MappingProxyType(splits), split_mode=raw.get("split_mode"),
                   overlapping_splits=MappingProxyType(overlaps), sample_checksums=checksums == SAMPLE_CHECKSUMS,
                   layout_version=raw.get("layout_version"), seq_len=raw.get("seq_len"),
                   document=MappingProxyType(raw))


def write_manifest(out_dir: Location, *, tokenizer: dict, splits: dict[str, dict], counts: dict, shard_size: int,
                   fetch_manifest: dict | None, split_rule: str, split_mode: str | None = None,
                   overlapping_splits: dict[str, int] | None = None) -> Manifest:
    """Write `out_dir/manifest.json` atomically (the last file of a shard run; in a store, one PUT
    after every shard's) and return it.

    `tokenizer`: the tokenizer's record (name, vocabulary, special ids, its files' sha256 and
    library version: a different tokenizer of the same size is told apart); `splits`: name ->
    {"num_samples", "shards": [{"path", "num_samples", "sha256"}]}; `counts`: `skipped` (samples, by
    reason), `damaged_tars`, `truncated_captions`, `duplicate_images`, `resized_images`.
    """
    document = {
        "layout_version": LAYOUT_VERSION,
        "seq_len": SEQ_LEN,
        # every shard has a `.crc` file beside it; the loaders verify each sample they read
        "sample_checksums": SAMPLE_CHECKSUMS,
        "tokenizer": tokenizer,
        "splits": splits,
        "skipped": dict(sorted(counts["skipped"].items())),
        "damaged_tars": counts["damaged_tars"],  # input tars cut or garbled (their lost samples are in `skipped`)
        "truncated_captions": counts["truncated_captions"],
        "duplicate_images": counts["duplicate_images"],
        "resized_images": counts["resized_images"],
        "shard_size": shard_size,
        "fetch_manifest": fetch_manifest,
        "split_rule": split_rule,
    }
    if overlapping_splits:
        document["split_mode"] = split_mode
        # images stored in both splits of each pair; `grr data check` expects exactly these
        document["overlapping_splits"] = overlapping_splits
    out_dir = location(out_dir)
    store.put_bytes(out_dir / MANIFEST, (json.dumps(document, indent=1, ensure_ascii=True) + "\n").encode("utf-8"))
    return Manifest._parse(out_dir, json.loads(json.dumps(document)))
