"""Running img2dataset: URL lists in, img2dataset-format folders out, resumable and quiet.

img2dataset resizes so that the *shorter* side equals `image_size` with `resize_mode="keep_ratio"`
(upscaling too when `resize_only_if_bigger=False`) and re-encodes at `encode_quality`. In
`incremental` mode a rerun skips every shard whose `_stats.json` exists, which is how an interrupted
fetch resumes; that needs the same URL list, so the list is kept in `OUT/_work/` and reused.

img2dataset's logger and workers are *spawned* processes, which re-import the main script; a script
read on stdin (`python - < x.py`) cannot be re-imported and the children die while the parent waits
forever, so that case is refused up front (`check_main_is_importable`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from grr_data.fetch.common import (
    IMAGE_SIZE,
    JPEG_QUALITY,
    WORK_DIR,
    FetchError,
    FetchOptions,
    complete_shards,
)

DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


def write_url_list(path: Path, columns: dict[str, list], source_id: str) -> Path:
    """Write a parquet URL list atomically; reuse the existing one when it was built from the same source."""
    marker = path.with_name(path.name + ".source")
    if path.exists() and marker.exists() and marker.read_text() == source_id:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)
    marker.write_text(source_id)
    return path


def _loopback_no_proxy() -> None:
    # A user's http_proxy must not swallow requests to 127.0.0.1 (the sample and the tests).
    for var in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in os.environ.get(var, "").split(",") if h]
        for host in ("127.0.0.1", "localhost"):
            if host not in hosts:
                hosts.append(host)
        os.environ[var] = ",".join(hosts)


@contextlib.contextmanager
def _stdout_to(log_path: Path | None):
    """Send fd 1 (ours and the worker processes') to `log_path`; stderr (errors, tqdm) stays visible."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def check_main_is_importable() -> None:
    """Raise FetchError where spawned processes could not re-import `__main__` (a script read on stdin)."""
    import multiprocessing.process

    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:
        return  # `python -m ...`: re-imported by module name
    path = getattr(main, "__file__", None)  # None for `python -c` and the REPL: nothing is re-imported
    if path is not None and not os.path.isfile(os.path.join(multiprocessing.process.ORIGINAL_DIR or "", path)):
        raise FetchError(
            f"img2dataset runs in spawned processes that re-import the main script, and this one ({path}) is "
            "not a file (read on stdin?), so they cannot start. Save the script to a .py file and run that, "
            "or use `grr data fetch NAME`."
        )


def img2dataset_options(options: FetchOptions, extra_columns: list[str] | None) -> dict:
    if options.distributor not in DISTRIBUTORS:
        raise FetchError(f"unknown distributor {options.distributor!r}; use one of {', '.join(DISTRIBUTORS)}")
    return {
        "image_size": IMAGE_SIZE,
        "resize_mode": "keep_ratio",
        "resize_only_if_bigger": False,
        "encode_quality": JPEG_QUALITY,
        "encode_format": "jpg",
        "output_format": "webdataset",
        "processes_count": options.workers,
        "thread_count": options.threads,
        "number_sample_per_shard": options.shard_size,
        "timeout": options.timeout,
        "retries": options.retries,
        "distributor": options.distributor,
        "incremental_mode": "incremental",
        "extract_exif": False,
        "enable_wandb": False,
        "compute_hash": "sha256",
        "save_additional_columns": extra_columns or None,
        # Our own lists and loopback servers: img2dataset's X-Robots-Tag check stays on (its default).
    }


def run_img2dataset(url_list: Path, out_dir: Path, options: FetchOptions, num_rows: int,
                    extra_columns: list[str] | None = None) -> dict:
    """Fetch every row of `url_list` (parquet: url, caption, extra columns) into `out_dir`.

    Returns the tool entry for the fetch manifest. Raises FetchError when shards are left
    unfinished after img2dataset's own retries, saying that a rerun resumes.
    """
    check_main_is_importable()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would phone home on import
    _loopback_no_proxy()
    from img2dataset import download

    opts = img2dataset_options(options, extra_columns)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(options.out) / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / f"img2dataset-{out_dir.name}.log" if options.quiet else None
    expected_shards = math.ceil(num_rows / options.shard_size)
    if len(complete_shards(out_dir)) < expected_shards:
        # img2dataset's own bar counts shards and has no label: say what it counts
        print(f"downloading {num_rows:,} images into {expected_shards} shard(s) in {out_dir} "
              "(img2dataset's bar counts shards)", file=sys.stderr, flush=True)
        sigint = signal.getsignal(signal.SIGINT)
        try:
            with _stdout_to(log_path):
                download(url_list=str(url_list), output_folder=str(out_dir), input_format="parquet",
                         url_col="url", caption_col="caption", **opts)
        except SystemExit as err:
            # img2dataset's SIGINT handler removes its temporary folder and calls sys.exit(0), which
            # would end a fetch that finished nothing with status 0; it is an interrupt.
            if err.code not in (0, None):
                raise
            raise KeyboardInterrupt from err
        finally:
            signal.signal(signal.SIGINT, sigint)
    done = len(complete_shards(out_dir))
    if done < expected_shards:
        where = f"; see {log_path}" if log_path else ""
        raise FetchError(
            f"{expected_shards - done} of {expected_shards} shards in {out_dir} did not finish{where}. "
            "Rerun the same command: finished shards are kept and only the rest is fetched."
        )
    return {"name": "img2dataset", "version": version("img2dataset"), "options": opts,
            "log": str(log_path) if log_path else None}
