"""Running img2dataset: URL lists in, img2dataset-format folders out, resumable and quiet.

img2dataset resizes so that the *shorter* side equals `image_size` with `resize_mode="keep_ratio"`
(upscaling too when `resize_only_if_bigger=False`) and re-encodes at `encode_quality`. In
`incremental` mode a rerun skips every shard whose `_stats.json` exists, which is how an interrupted
fetch resumes; that needs the same URL list, so the list is kept in `OUT/_work/` and reused.

img2dataset's logger is a *spawned* process, which re-imports the main script; a script read on
stdin (`python - < x.py`) cannot be re-imported and the child dies at its start, so that case is
refused up front (`check_main_is_importable`).

The shards of the `multiprocessing` distributor are downloaded by grr's WorkerPool
(`distribute_shards`), not by img2dataset's spawned multiprocessing.Pool: a stop signal must stop
the fetch cleanly, and that Pool cannot be stopped so when its workers got the signal too (a
SIGTERM to the process group): one that died waiting for work leaves the Pool's queue lock taken,
and its terminate() waits for it forever (docs/LOG.md). SIGTERM and Ctrl-C reach img2dataset's own
SIGINT handler (grr_data.infra.procs.stop_on_signals), which removes its temporary folder and ends
its logger process; its SystemExit(0) becomes KeyboardInterrupt here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import math
import multiprocessing
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
from grr_data.infra.files import publish, tmp_path_for, write_text_atomic
from grr_data.infra.procs import WorkerPool, usable_cores
from grr_data.infra.progress import progress

DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
# What each distributor needs installed, and how (img2dataset imports these only when asked, and with
# ray missing it used to do nothing at all).
_DISTRIBUTOR_NEEDS = {
    "pyspark": ("pyspark", "pip install pyspark (and Java 8/11/17 for Spark); on a cluster, start the "
                "SparkSession before the fetch, as img2dataset's README shows"),
    "ray": ("ray", "pip install 'ray[default]'; on a cluster, start it with `ray start` first"),
}
# Set by grr itself: the fetch output contract (CONTRACTS.md "Fetch output") or grr's own flags.
_OWN_OPTIONS = {
    "url_list": None, "output_folder": None, "input_format": None, "url_col": None, "caption_col": None,
    "output_format": None, "image_size": None, "resize_mode": None, "resize_only_if_bigger": None,
    "encode_format": None, "encode_quality": None, "save_additional_columns": None, "incremental_mode": None,
    "compute_hash": None, "oom_shard_count": None, "processes_count": "--workers", "thread_count": "--threads",
    "number_sample_per_shard": "--shard-size", "timeout": "--timeout", "retries": "--retries",
    "distributor": "--distributor",
}


def write_url_list(path: Path, columns: dict[str, list], source_id: str) -> Path:
    """Write a parquet URL list atomically; reuse the existing one when it was built from the same source."""
    marker = path.with_name(path.name + ".source")
    if path.exists() and marker.exists() and marker.read_text() == source_id:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    pq.write_table(pa.table(columns), tmp)
    publish(tmp, path)
    write_text_atomic(marker, source_id)
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


def machine_defaults(num_shards: int | None = None) -> tuple[int, int]:
    """(processes, threads per process) when --workers/--threads are not given.

    One process per usable core (resizing and encoding are CPU work), but no more than there are
    shards (a process works on one shard at a time; each one costs seconds to start); downloads wait
    on the network, so each process runs several threads: about 128 connections in all, 8 to 32 per
    process.
    """
    workers = usable_cores() if num_shards is None else max(1, min(usable_cores(), num_shards))
    return workers, max(8, min(32, 128 // workers))


def resolve_workers(options: FetchOptions, num_shards: int | None = None) -> tuple[int, int, str]:
    """(processes, threads, a line saying where they came from)."""
    workers, threads = machine_defaults(num_shards)
    chosen = (options.workers or workers, options.threads or threads)
    given = [flag for flag, value in (("--workers", options.workers), ("--threads", options.threads)) if value]
    how = f"defaults for {usable_cores()} usable CPU cores" + (f" and {num_shards} shard(s)" if num_shards else "")
    how = "given" if len(given) == 2 else how + (f", {given[0]} given" if given else "")
    return (*chosen, f"img2dataset: {chosen[0]} processes x {chosen[1]} threads ({how}; "
                     "--workers/--threads to change)")


def check_distributor(name: str) -> None:
    """FetchError naming what to install when `name` needs a package that is missing."""
    if name not in DISTRIBUTORS:
        raise FetchError(f"unknown distributor {name!r}; use one of {', '.join(DISTRIBUTORS)}")
    if name in _DISTRIBUTOR_NEEDS:
        module, how = _DISTRIBUTOR_NEEDS[name]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise FetchError(f"--distributor {name} needs {module}, which is not installed here: {how}") from err


def _download_signature() -> inspect.Signature:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would phone home on import
    from img2dataset import download

    return inspect.signature(download)


def _typed(key: str, text: str, annotation) -> object:
    """`text` as img2dataset's parameter `key` wants it (its annotations: int, float, bool, str, lists)."""
    kind = str(annotation)
    if text.lower() in ("none", "null") and "Optional" in kind:
        return None
    try:
        if annotation is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1", "yes")
        if annotation in (int, float):
            return annotation(text)
        if "List" in kind or "list" in kind:
            return [part.strip() for part in text.split(",") if part.strip()]
        return text
    except ValueError as err:
        raise FetchError(f"--img2dataset-option {key}={text}: {err}") from err


def parse_passthrough(items: list[str]) -> dict:
    """`key=value` strings for img2dataset's `download`, typed by its signature; lists are comma-separated."""
    if not items:
        return {}
    params = _download_signature().parameters
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise FetchError(f"--img2dataset-option {item!r}: write it as key=value (e.g. min_image_size=64)")
        if key in _OWN_OPTIONS:
            flag = _OWN_OPTIONS[key]
            raise FetchError(f"--img2dataset-option {key}: " + (f"use {flag}" if flag else
                             "grr sets it itself (the fetch output format), so it cannot be changed"))
        if key not in params:
            known = ", ".join(sorted(k for k in params if k not in _OWN_OPTIONS))
            raise FetchError(f"--img2dataset-option {key}: img2dataset's download() has no such option; "
                             f"it takes {known}")
        parsed[key] = _typed(key, text.strip(), params[key].annotation)
    return parsed


def img2dataset_options(options: FetchOptions, extra_columns: list[str] | None,
                        num_shards: int | None = None) -> dict:
    check_distributor(options.distributor)
    workers, threads, _ = resolve_workers(options, num_shards)
    return {
        "image_size": IMAGE_SIZE,
        "resize_mode": "keep_ratio",
        "resize_only_if_bigger": False,
        "encode_quality": JPEG_QUALITY,
        "encode_format": "jpg",
        "output_format": "webdataset",
        "processes_count": workers,
        "thread_count": threads,
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
        **parse_passthrough(options.img2dataset_options),
    }


def distribute_shards(processes_count: int, downloader, reader, subjob_size, max_shard_retry: int) -> None:
    """img2dataset's `multiprocessing` distributor (its arguments; `subjob_size` is pyspark's), on
    grr's WorkerPool: forked workers that leave SIGTERM and SIGINT to the main process, die with it,
    and are killed by it on a stop (a partial shard has no `_stats.json`, so a rerun fetches it
    again). As img2dataset's own: one shard per worker at a time, a worker replaced after 5 shards,
    failed shards retried `max_shard_retry` times."""
    with WorkerPool(functools.partial(_download_shard, downloader), processes_count, max_items_per_worker=5) as pool, \
            progress(desc="img2dataset", unit="shard") as bar:
        failed = _run_shards(pool, reader, bar)
        for attempt in range(max_shard_retry):
            if not failed:
                break
            print(f"Retrying {len(failed)} shards, try {attempt + 1}")
            failed = _run_shards(pool, failed, bar)
        if failed:
            print(f"{len(failed)} shards still failed after {max_shard_retry} retries")


def _download_shard(downloader, row) -> tuple[bool, tuple]:
    try:
        return downloader(row)
    finally:
        sys.stdout.flush()  # a worker ends with os._exit: its img2dataset log lines must be out first


def _run_shards(pool: WorkerPool, rows, bar) -> list:
    """Each of `rows` (shard id, shard file) through `pool`; the rows that failed."""
    failed, rows = [], iter(rows)
    while True:
        while pool.num_idle and (row := next(rows, None)) is not None:
            pool.submit(row)
        if not pool.num_busy:
            return failed
        try:
            _, (ok, row) = pool.next_done()
        except RuntimeError as err:  # a worker died (the OOM killer): the shard stays unfinished
            raise FetchError(str(err)) from None
        if not ok:
            failed.append(row)
        bar.update()


@contextlib.contextmanager
def _img2dataset_processes():
    """For the block, img2dataset's `multiprocessing` distributor is `distribute_shards`; on an
    exception, the processes img2dataset started in it are ended: its logger process loops until
    told to finish, which img2dataset does only on success and in its SIGINT handler, so it would
    run on beside a Python caller that goes on after a FetchError (and one still starting fails
    with a traceback once this process has ended)."""
    main = importlib.import_module("img2dataset.main")  # the package's `main` attribute is its function
    saved = getattr(main, "multiprocessing_distributor", None)
    if saved is None:  # an img2dataset whose internals moved: say so rather than fetch without the stop handling
        raise FetchError(f"img2dataset {version('img2dataset')} has no img2dataset.main.multiprocessing_distributor, "
                         "which grr replaces with its own worker pool; install the version grr is tested with: "
                         "pip install 'img2dataset==1.47.0'")
    main.multiprocessing_distributor = distribute_shards
    before = set(multiprocessing.active_children())
    try:
        yield
    except BaseException:
        for child in set(multiprocessing.active_children()) - before:
            child.terminate()
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
                child.join()
        raise
    finally:
        main.multiprocessing_distributor = saved


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

    expected_shards = math.ceil(num_rows / options.shard_size)
    opts = img2dataset_options(options, extra_columns, expected_shards)
    print(resolve_workers(options, expected_shards)[2], file=sys.stderr, flush=True)
    if options.distributor == "pyspark":
        from pyspark.sql import SparkSession

        if SparkSession.getActiveSession() is None:  # img2dataset then makes a one-machine local[N] session
            print(f"pyspark: no active SparkSession, so img2dataset starts a local one on this machine "
                  f"(local[{opts['processes_count']}]); for a cluster, create the session in a Python script "
                  "and call grr_data.fetch.fetch from it (README: Fetching CC12M on a Spark cluster)",
                  file=sys.stderr, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(options.out) / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / f"img2dataset-{out_dir.name}.log" if options.quiet else None
    if len(complete_shards(out_dir)) < expected_shards:
        # img2dataset's own bar counts shards and has no label: say what it counts
        print(f"downloading {num_rows:,} images into {expected_shards} shard(s) in {out_dir} "
              "(the bar counts shards)", file=sys.stderr, flush=True)
        sigint = signal.getsignal(signal.SIGINT)
        try:
            with _stdout_to(log_path), _img2dataset_processes():
                download(url_list=str(url_list), output_folder=str(out_dir), input_format="parquet",
                         url_col="url", caption_col="caption", **opts)
        except SystemExit as err:
            # img2dataset's SIGINT handler (Ctrl-C, and SIGTERM: grr_data.infra.procs.stop_on_signals)
            # removes its temporary folder and calls sys.exit(0), which would end a fetch that
            # finished nothing with status 0; it is an interrupt.
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
