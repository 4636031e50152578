"""`grr data fetch cc12m --retry-failed`: one more pass over the URLs a finished fetch could not get.

What it retries: every row of the folder's per-shard parquet files (img2dataset writes one row per
URL with a `status` column) whose status is not `success` and that no earlier retry pass has already
retried. Those URLs are fetched again with img2dataset into `OUT/_work/retry-N/`, and the result is
added to OUT as new shards numbered after the existing ones (their own keys; nothing is rewritten).
Each new parquet row carries `retry_of`, the key of the row it retries, so the counts stay per URL:
attempted is unchanged, a recovered URL moves from the failures to the samples, and
`fetch_manifest.json` gets the merged counts plus a `retries` entry per pass.

Only cc12m: it is the one flat img2dataset folder. mscoco and the sample fetch each image once into a
staging folder that is deleted once the pairs are written; to retry those, fetch again into a new folder.
Failures that a retry cannot fix (404, not an image) are retried too: img2dataset's status does not
say which failures are permanent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from grr_data.fetch.common import (
    FETCH_MANIFEST,
    WORK_DIR,
    FetchError,
    FetchOptions,
    SplitCounts,
    complete_shards,
    failure_reason,
)
from grr_data.fetch.convert import SHARD_DIGITS, PairWriter, SourceImage
from grr_data.fetch.img2ds import run_img2dataset, write_url_list
from grr_data.fetch.staged import final_info, iter_downloaded
from grr_data.infra.files import write_json_atomic

RETRYABLE = ("cc12m",)
_COLUMNS = ("key", "url", "caption", "status", "error_message", "retry_of")


def read_rows(folder: Path) -> list[dict]:
    """The parquet rows (one per attempted URL) of the complete shards in `folder`."""
    rows = []
    for tar in complete_shards(folder):
        path = tar.with_suffix(".parquet")
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as err:
            raise FetchError(f"{path}: cannot read this shard's status list ({err}); delete the shard "
                             f"({tar.name}, its parquet and stats) and rerun the fetch without --retry-failed") from err
        names = [c for c in _COLUMNS if c in table.column_names]
        for row in table.select(names).to_pylist():
            rows.append({c: row.get(c) for c in _COLUMNS})
    return rows


def still_failed(rows: list[dict]) -> list[dict]:
    """Failed rows not retried by a later pass (a retried row's outcome is its retry's row)."""
    retried = {r["retry_of"] for r in rows if r["retry_of"] is not None}
    return [r for r in rows if r["status"] != "success" and r["key"] not in retried]


def merged_counts(folder: Path) -> tuple[SplitCounts, Counter]:
    """Per-URL counts of a folder with retry shards: attempted counts original rows only, failures the
    rows still failed, samples every success. Also the raw messages of those failures."""
    rows = read_rows(folder)
    counts, raw = SplitCounts(), Counter()
    counts.num_shards = len(complete_shards(folder))
    counts.num_attempted = sum(r["retry_of"] is None for r in rows)
    counts.num_samples = sum(r["status"] == "success" for r in rows)
    for row in still_failed(rows):
        message = row["error_message"] or row["status"]
        counts.failures[failure_reason(message)] += 1
        raw[message] += 1
    return counts, raw


def _fetched(staging: Path):
    """SourceImages of a retry download in key order, failed ones with their error."""
    for meta, jpg in iter_downloaded(staging, ["caption", "retry_of"]):
        common = {"image_id": None, "captions": [meta["caption"] or ""], "source": meta["url"],
                  "extra": {"retry_of": meta["retry_of"]}}
        if jpg is None:
            yield SourceImage(**common, read=None, error=meta["error_message"] or "unknown error")
        else:
            yield SourceImage(**common, read=lambda jpg=jpg: jpg, final=final_info(meta))


def _next_shard_id(folder: Path) -> int:
    ids = [int(p.stem) for p in folder.glob("*.tar") if p.stem.isdigit()]
    return max(ids, default=-1) + 1


def retry_failed(name: str, options: FetchOptions) -> dict:
    """Retry the failed downloads of the finished fetch in `options.out`; returns the updated manifest."""
    if name not in RETRYABLE:
        raise FetchError(f"--retry-failed works on {', '.join(RETRYABLE)} (a flat img2dataset folder); {name} "
                         "fetches images through a staging folder that is gone once it finishes: fetch it "
                         "again into a new --out folder instead")
    start = time.time()
    out = Path(options.out)
    manifest_path = out / FETCH_MANIFEST
    if not manifest_path.exists():
        raise FetchError(f"{out}: no finished fetch there ({FETCH_MANIFEST} missing); run the fetch without "
                         "--retry-failed first (rerunning it also resumes an interrupted one)")
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    failed = still_failed(read_rows(out))
    passes = data.setdefault("retries", [])
    if not failed:
        data.setdefault("warnings", []).append("--retry-failed: no failed downloads left to retry")
        data["elapsed_s"] = time.time() - start
        return data
    work = out / WORK_DIR / f"retry-{len(passes) + 1}"
    source_id = hashlib.sha256("\n".join(r["key"] for r in failed).encode()).hexdigest()
    marker = work / "urls.parquet.source"
    if work.exists() and not (marker.exists() and marker.read_text() == source_id):
        shutil.rmtree(work)  # a pass interrupted after adding some shards: its download is for other rows
    url_list = write_url_list(work / "urls.parquet", {
        "url": [r["url"] for r in failed], "caption": [r["caption"] for r in failed],
        "retry_of": [r["key"] for r in failed]}, source_id)
    tool = run_img2dataset(url_list, work / "download", options, len(failed), extra_columns=["retry_of"])
    before = sum(r["status"] == "success" for r in read_rows(out))
    writer = PairWriter(out, options.shard_size, first_shard=_next_shard_id(out))
    for image in _fetched(work / "download"):
        writer.add(image)
    writer.close()
    counts, raw = merged_counts(out)
    passes.append({"pass": len(passes) + 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "retried": len(failed), "recovered": counts.num_samples - before,
                   "first_shard": f"{writer.first_shard:0{SHARD_DIGITS}d}", "img2dataset_options": tool["options"]})
    data["splits"]["all"].update(counts.to_dict())
    data["top_failure_messages"] = dict(raw.most_common(20))
    write_json_atomic(manifest_path, data)
    shutil.rmtree(work, ignore_errors=True)
    data["elapsed_s"] = time.time() - start  # this pass's time in the summary (the file keeps the fetch's)
    return data
