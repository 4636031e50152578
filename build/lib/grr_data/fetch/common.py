"""What every fetcher shares: options, errors, failure reasons, per-folder counts and `fetch_manifest.json`.

A fetched folder is in img2dataset's output format (docs/CONTRACTS.md "Fetch output"); a shard counts
as complete once its `NNNNN_stats.json` exists, which img2dataset and our converters both write last.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from grr_data.fetch.catalog import load_manifest
from grr_data.format.image import IMAGE_SIZE, JPEG_QUALITY
from grr_data.infra.files import publish, sha256_file, write_json_atomic
from grr_data.infra.progress import progress

FETCH_MANIFEST = "fetch_manifest.json"
WORK_DIR = "_work"  # URL lists and logs; holds no tars, so readers of OUT/*.tar never see it


class FetchError(RuntimeError):
    """A fetch cannot go on; the message names the file or URL and what the user can do."""


@dataclass
class FetchOptions:
    out: Path
    source: Path | None = None  # --from
    workers: int | None = None  # img2dataset processes (None: one per usable CPU core)
    threads: int | None = None  # download threads per process (None: sized from workers, see img2ds)
    distributor: str = "multiprocessing"
    timeout: int = 10
    retries: int = 2
    shard_size: int = 10_000
    paper_split: bool = False  # roco only
    karpathy: Path | None = None  # flickr30k, and mscoco with split="karpathy"
    split: str | None = None  # mscoco: "official" (default) or "karpathy"
    img2dataset_options: list[str] = field(default_factory=list)  # "key=value", passed to img2dataset
    retry_failed: bool = False  # a pass over the failed downloads of a finished fetch (grr_data.fetch.retry)
    num_pairs: int | None = None  # shapes only (default there: 2000)
    seed: int | None = None  # shapes only (default there: 0)
    quiet: bool = True  # send img2dataset's chatter to OUT/_work/*.log
    break_lock: bool = False  # take over OUT's lock left by a fetch on another host (grr_data.infra.lock)


@dataclass
class SplitCounts:
    num_samples: int = 0
    num_attempted: int = 0
    num_shards: int = 0
    failures: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "num_attempted": self.num_attempted,
            "num_shards": self.num_shards,
            "failures": dict(sorted(self.failures.items())),
        }


_REASONS = (
    (re.compile(r"HTTP Error (\d+)"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"cannot identify image|cannot decode|image file is truncated|not an image|decod", re.I), "not_an_image"),
    (re.compile(r"Connection refused", re.I), "connection_refused"),
    (re.compile(r"Connection reset|RemoteDisconnected|IncompleteRead", re.I), "connection_reset"),
    # getaddrinfo's errors: EAI_NONAME (-2), EAI_AGAIN (-3, a resolver that timed out or is overloaded),
    # EAI_NODATA (-5), and their macOS and musl spellings
    (re.compile(r"Name or service not known|Temporary failure in name resolution|No address associated with "
                r"hostname|Name does not resolve|getaddrinfo|nodename nor servname", re.I), "dns"),
    (re.compile(r"CERTIFICATE|SSL", re.I), "ssl"),
    (re.compile(r"X-Robots-Tag", re.I), "disallowed_by_robots_tag"),
    (re.compile(r"unknown url type|no host given", re.I), "bad_url"),
    (re.compile(r"No such file|missing", re.I), "missing_file"),
    (re.compile(r"hash mismatch|image too small|image area too large|aspect ratio too large"), None),
)


def failure_reason(message: str) -> str:
    """A stable, countable reason for one img2dataset error message (raw ones carry addresses and URLs)."""
    for pattern, reason in _REASONS:
        match = pattern.search(message)
        if match:
            if reason is None:
                return match.group(0).replace(" ", "_")
            return reason(match) if callable(reason) else reason
    return "other"


def count_folder(folder: Path) -> tuple[SplitCounts, Counter]:
    """Counts from the complete shards in `folder` and the raw failure messages (for the log)."""
    counts, raw = SplitCounts(), Counter()
    for stats_path in sorted(folder.glob("*_stats.json")):
        try:
            stats = json.loads(stats_path.read_text())
        except json.JSONDecodeError as err:
            raise FetchError(f"{stats_path}: damaged stats file ({err}); delete it to refetch that shard") from err
        counts.num_shards += 1
        counts.num_samples += stats["successes"]
        counts.num_attempted += stats["count"]
        for message, n in stats.get("status_dict", {}).items():
            if message != "success":
                counts.failures[failure_reason(message)] += n
                raw[message] += n
    return counts, raw


def complete_shards(folder: Path) -> list[Path]:
    """The tars of `folder` whose stats file exists (a tar without one is being, or was never, finished)."""
    return [p for p in sorted(folder.glob("*.tar")) if (folder / f"{p.stem}_stats.json").exists()]


def describe_source(path_or_url: str | Path) -> dict:
    """A source entry for the fetch manifest: a local file gets its size and sha256."""
    path = Path(path_or_url)
    if path.is_file():
        return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if path.is_dir():
        return {"path": str(path.resolve()), "kind": "folder"}
    return {"url": str(path_or_url)}


def check_expected(manifest: dict, split_counts: dict[str, SplitCounts], unit: str = "pairs") -> list[str]:
    """Warnings where a split's count differs from the manifest's expected count (tiny stand-ins always do)."""
    expected = manifest.get("expected", {}).get(unit, {})
    alternatives = manifest.get("expected", {}).get("alternatives", {})
    warnings = []
    for split, counts in split_counts.items():
        want = expected.get(split)
        if want is None:
            continue
        attempted = counts.num_attempted
        if attempted != want and attempted not in alternatives.get(split, []):
            warnings.append(f"{split}: {attempted} {unit} in the source, the manifest expects {want}")
    return warnings


class FetchReport:
    """Collects what one fetch did and writes `fetch_manifest.json` (atomically) and a summary."""

    def __init__(self, dataset: str, options: FetchOptions):
        self.dataset = dataset
        self.options = options
        self.manifest = load_manifest(dataset)
        self.start = time.time()
        self.sources: list[dict] = []
        self.splits: dict[str, SplitCounts] = {}
        self.raw_failures: Counter = Counter()
        self.tool: dict = {}
        self.warnings: list[str] = []
        self.extra: dict = {}
        self.source_counts: dict[str, SplitCounts] | None = None  # checked against the manifest instead
        self.count_unit = "pairs"  # of source_counts: "pairs" or "images", as in the manifest's "expected"

    def add_split(self, name: str, folder: Path, counts: SplitCounts | None = None) -> SplitCounts:
        if counts is None:
            counts, raw = count_folder(folder)
            self.raw_failures.update(raw)
        self.splits[name] = counts
        return counts

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def finish(self) -> dict:
        elapsed = time.time() - self.start
        checked = self.splits if self.source_counts is None else self.source_counts
        self.warnings += check_expected(self.manifest, checked, self.count_unit)
        out = Path(self.options.out)
        data = {
            "dataset": self.dataset,
            "title": self.manifest.get("title"),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed, 1),
            "layout": "flat" if list(self.splits) == ["all"] else "splits",
            "splits": {
                name: {"path": "." if name == "all" else name, **counts.to_dict()}
                for name, counts in self.splits.items()
            },
            "pairing": self.manifest.get("pairing"),
            "split_rule": self.manifest.get("split_rule"),
            "licence": self.manifest.get("licence"),
            "citation": self.manifest.get("citation"),
            "image": {"shorter_side": IMAGE_SIZE, "jpeg_quality": JPEG_QUALITY},
            "sources": self.sources,
            "tool": self.tool,
            "top_failure_messages": dict(self.raw_failures.most_common(20)),
            "warnings": self.warnings,
            **self.extra,
        }
        write_json_atomic(out / FETCH_MANIFEST, data)
        data["elapsed_s"] = elapsed
        return data


def summary_lines(data: dict) -> list[str]:
    """The human summary printed at the end of a fetch."""
    lines = [f"{data['dataset']}: fetched in {data['elapsed_s']:.1f} s"]
    for name, split in data["splits"].items():
        failed = split["num_attempted"] - split["num_samples"]
        reasons = ", ".join(f"{r} {n}" for r, n in split["failures"].items()) or "none"
        lines.append(
            f"  {name}: {split['num_samples']} done, {failed} failed ({reasons}), {split['num_shards']} shards"
        )
    if data.get("retries"):
        last = data["retries"][-1]
        lines.append(f"  retry pass {last['pass']}: {last['retried']} failed URLs fetched again, "
                     f"{last['recovered']} recovered (counts above are per URL, all passes merged)")
    lines += [f"  warning: {w}" for w in data["warnings"]]
    dns = sum(split["failures"].get("dns", 0) for split in data["splits"].values())
    if dns:
        lines.append(DNS_ADVICE.format(count=dns))
    return lines


# img2dataset's most repeated support question: a resolver that cannot keep up with its threads.
DNS_ADVICE = ("  note: {count} URLs failed in the DNS look-up. Many such failures mean a slow or overloaded resolver: "
              "run a local caching one (img2dataset's README sets up knot-resolver, kresd) and point /etc/resolv.conf "
              "at it, or lower --threads; then fetch them again with --retry-failed")


def source_or_download(options: FetchOptions, url: str, what: str, folder_ok: bool = False) -> Path:
    """`--from` when given (it must exist; `what` tells the user what to pass), else `url` downloaded
    once into OUT/_work/ under its own file name."""
    if options.source is not None:
        path = Path(options.source)
        if not (path.exists() if folder_ok else path.is_file()):
            raise FetchError(f"--from {path}: no such file{' or folder' if folder_ok else ''}; pass {what}")
        return path
    from urllib.parse import urlparse

    return download_file(url, Path(options.out) / WORK_DIR / Path(urlparse(url).path).name)


def download_file(url: str, dest: Path, timeout: float = 60) -> Path:
    """Download `url` to `dest` (kept if already there) with a progress bar; a partial file never lands."""
    import urllib.error
    import urllib.request

    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise FetchError(
            f"cannot download {url} ({err}). Download it yourself where you have a network and pass it "
            f"with --from, or place it at {dest}."
        ) from err
    publish(tmp, dest)
    return dest
