"""Which split each sample goes to: a stable image hash (`95/5`) or the source's own split.

The rule is applied in input order by one `SplitAssigner`, so the result does not depend on
worker counts. An image never lands in two splits: the first copy of an image (by content hash)
or of a source image id fixes its split, and later copies follow it. Under `95/5` a duplicate
image is kept (in its first copy's split) and counted. Under `source` a copy whose source split
differs from its first copy's is dropped (`duplicate_across_splits`); inputs are read test, val,
train, so the evaluation splits stay whole and train loses the copy. Under a percentage rule the
image id decides before the content hash; a sample whose image id is placed in one split and whose
bytes are already in another is dropped the same way. The one exception is a pair
of splits the fetch output declares as overlapping (ROCO's `--paper-split`: train = train + valid,
val = valid): copies across that pair are kept, and the shared images are counted per pair.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

SPLITS = ("train", "val", "test")
SOURCE_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                      "validation": "val", "dev": "val", "test": "test", "testing": "test"}
_BUCKETS = 10_000


def normalize_split(name: str | None) -> str | None:
    return SOURCE_SPLIT_NAMES.get(str(name).strip().lower()) if name is not None else None


def pair_name(a: str, b: str) -> str:
    """`train/val`, `train/test`, `val/test`: the name of a pair of splits in manifest.json."""
    return "/".join(sorted((a, b), key=SPLITS.index))


def declared_overlaps(fetch_manifest: dict | None) -> frozenset[str]:
    """The pairs of output splits a fetch output deliberately overlaps (`split_mode` "paper").

    Pairs whose `source_splits` routing shares a source split (ROCO's paper split routes
    `valid` into both train and val); train/val when the routing is not recorded."""
    if not isinstance(fetch_manifest, dict) or fetch_manifest.get("split_mode") != "paper":
        return frozenset()
    routing = fetch_manifest.get("source_splits")
    if not isinstance(routing, dict):
        return frozenset({pair_name("train", "val")})
    sources = {normalize_split(out): set(srcs) for out, srcs in routing.items() if normalize_split(out)}
    return frozenset(pair_name(a, b) for a in sources for b in sources
                     if SPLITS.index(a) < SPLITS.index(b) and sources[a] & sources[b])


@dataclass(frozen=True)
class SplitRule:
    """`source`, or percentages for train/val[/test] summing to 100 (e.g. 95/5, 90/5/5)."""

    source: bool
    percents: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SplitRule:
        if text.strip().lower() == "source":
            return cls(source=True)
        try:
            percents = tuple(float(p) for p in text.split("/"))
        except ValueError:
            percents = ()
        if not 2 <= len(percents) <= 3 or any(p < 0 for p in percents) or abs(sum(percents) - 100) > 1e-6:
            raise ValueError(f"--split {text!r}: use `source` or percentages summing to 100, e.g. 95/5 or 90/5/5")
        return cls(source=False, percents=percents)

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.source else SPLITS[: len(self.percents)]

    def describe(self) -> str:
        if self.source:
            return "source splits"
        return "/".join(f"{p:g}" for p in self.percents) + " by image hash (source image id, else image sha256)"

    def split_of_hash(self, digest: bytes) -> str:
        bucket = int.from_bytes(digest[:8], "little") % _BUCKETS
        edge = 0.0
        for name, percent in zip(self.splits, self.percents, strict=True):
            edge += percent * _BUCKETS / 100
            if bucket < edge:
                return name
        return self.splits[-1]


@dataclass
class SampleIdentity:
    """What the split decision reads about a sample."""

    image_sha256: bytes  # digest of the input image bytes
    image_id: str | None = None  # the source's image id, shared by all captions of one image
    source_split: str | None = None  # normalised source split, when the rule is `source`


class SplitAssigner:
    """Assigns splits in input order; counts duplicates. Keeps two maps (image hash and image id
    to split), about 100 bytes per distinct image: ~1.2 GB for CC12M."""

    def __init__(self, rule: SplitRule, allowed_overlaps: frozenset[str] = frozenset()):
        self.rule = rule
        self.allowed_overlaps = allowed_overlaps if rule.source else frozenset()
        self.overlaps: Counter = Counter()  # pair name -> images kept in both splits of the pair
        self._more_splits: dict[int, set[str]] = {}  # content -> its splits beyond the first (allowed overlaps)
        self._by_hash: dict[int, str] = {}  # first 8 bytes of the image sha256 -> split
        self._id_of_hash: dict[int, str] = {}  # the image id that first showed this content
        self._by_id: dict[str, str] = {}
        self.num_duplicate_images = 0

    def assign(self, sample: SampleIdentity) -> str | None:
        """The sample's split, or None when it must be dropped (a duplicate across source splits)."""
        content = int.from_bytes(sample.image_sha256[:8], "little")
        seen = self._by_hash.get(content)
        # another caption of the same source image is not a duplicate; a copy under another id is
        if seen is not None and (sample.image_id is None or self._id_of_hash.get(content) != sample.image_id):
            self.num_duplicate_images += 1
        if self.rule.source:
            split = sample.source_split
            if seen is not None and seen != split and not self._overlap_allowed(content, seen, split):
                return None
        elif sample.image_id is not None and sample.image_id in self._by_id:
            # the image id decides before the content, so an image's captions stay together; a
            # caption whose bytes already live in another split would put those bytes in two: dropped
            split = self._by_id[sample.image_id]
            if seen is not None and seen != split:
                return None
        elif seen is not None:
            split = seen
        elif sample.image_id is not None:
            split = self.rule.split_of_hash(hashlib.sha256(f"image_id:{sample.image_id}".encode()).digest())
        else:
            split = self.rule.split_of_hash(sample.image_sha256)
        if seen is None:
            self._by_hash[content] = split
            if sample.image_id is not None:
                self._id_of_hash[content] = sample.image_id
        if sample.image_id is not None:
            self._by_id.setdefault(sample.image_id, split)
        return split

    def _overlap_allowed(self, content: int, first: str, split: str) -> bool:
        """Whether a copy of an image already in `first` may also go to `split`; counts it if so."""
        more = self._more_splits.get(content, set())
        if split in more:
            return True
        homes = {first} | more
        if not all(pair_name(home, split) in self.allowed_overlaps for home in homes):
            return False
        for home in homes:
            self.overlaps[pair_name(home, split)] += 1
        self._more_splits.setdefault(content, set()).add(split)
        return True
