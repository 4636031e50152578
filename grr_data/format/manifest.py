"""The one reader of a sharded set's `manifest.json` (written by `grr_data.shard.run`).

Code outside `grr_data` learns what a set holds from `DatasetInfo.read(data_dir)`: its
splits and their sizes, the tokenizer it was made with and its special ids, and whether its
splits overlap on purpose (ROCO's paper split). The manifest's schema stays `grr_data`'s:
a field renamed in `shard.py` is renamed here, and nowhere else.

Every problem reading it is one ValueError naming the file and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from grr_data.format.layout import LAYOUT_VERSION, SEQ_LEN, SpecialIds

MANIFEST = "manifest.json"


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


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    tokenizer: TokenizerRecord
    splits: Mapping[str, SplitInfo]  # in the manifest's order
    split_mode: str | None  # "paper" for ROCO's paper split, else None
    overlapping_splits: Mapping[str, int]  # "train/val" -> images stored in both, declared on purpose

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def special(self) -> SpecialIds:
        return self.tokenizer.special

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: split.num_samples for name, split in self.splits.items()}

    def num_samples(self, split: str) -> int:
        """Samples in `split`; a ValueError naming the splits the set has when it lacks one."""
        if split not in self.splits:
            raise ValueError(f"{self.manifest_path}: no split {split!r}; the set has {', '.join(self.splits) or 'none'}")
        return self.splits[split].num_samples

    @staticmethod
    def exists(data_dir: str | os.PathLike) -> bool:
        """Whether `data_dir` holds a manifest (a finished `grr data shard`)."""
        return (Path(data_dir) / MANIFEST).is_file()

    @classmethod
    def read(cls, data_dir: str | os.PathLike) -> DatasetInfo:
        root = Path(data_dir)
        path = root / MANIFEST
        hint = f"is {root} a sharded set (grr data shard)?"
        if not path.is_file():
            raise ValueError(f"{path} not found: {hint}")
        try:
            raw = json.loads(path.read_text())
            info = cls._parse(root, raw)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            reason = f"missing {err}" if isinstance(err, KeyError) else (str(err).splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path}: cannot read the set's manifest ({reason}); {hint}") from err
        if raw.get("layout_version") != LAYOUT_VERSION or raw.get("seq_len") != SEQ_LEN:
            raise ValueError(f"{path}: layout_version {raw.get('layout_version')}, seq_len {raw.get('seq_len')}; "
                             f"this grr reads {LAYOUT_VERSION}/{SEQ_LEN}: re-shard the set")
        return info

    @classmethod
    def _parse(cls, root: Path, raw: dict) -> DatasetInfo:
        tok = raw["tokenizer"]
        special = SpecialIds(pad=int(tok["pad"]), eos=int(tok["eos"]), bos=int(tok["bos"]), cls=int(tok["cls"]),
                             vocab_size=int(tok["vocab_size"]))
        splits = {
            str(name): SplitInfo(
                num_samples=int(split["num_samples"]),
                shards=tuple(ShardEntry(str(s["path"]), int(s["num_samples"]), s.get("sha256"))
                             for s in split["shards"]),
            )
            for name, split in raw["splits"].items()
        }
        overlaps = {str(pair): int(count) for pair, count in (raw.get("overlapping_splits") or {}).items()}
        return cls(root=root, tokenizer=TokenizerRecord(str(tok["name"]), special, MappingProxyType(dict(tok))),
                   splits=MappingProxyType(splits), split_mode=raw.get("split_mode"),
                   overlapping_splits=MappingProxyType(overlaps))
