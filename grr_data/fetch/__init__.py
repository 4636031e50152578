"""`grr data fetch`: dataset sources to img2dataset-format folders of 288-px JPEGs (CONTRACTS.md "Fetch output").

Calling `fetch` from Python: the URL-based fetches (cc12m, mscoco without local images, sample) run
img2dataset, whose spawned processes re-import the main script, so call it from a script saved in a
file (or `python -c`, or `python -m`), not one piped on stdin; that case raises FetchError at once.

A fetch holds its output folder's lock (grr_data.infra.lock, as `grr data shard` does) from its
first write to its end, so a second fetch into the same folder fails at once naming the first
(PID, host, since when) and touches nothing there.

A stop signal (Ctrl-C; SIGTERM from Slurm, Kubernetes, `timeout` or a preempted VM, to this process
or its whole process group) ends a fetch with `Interrupted` (a KeyboardInterrupt naming the signal,
grr_data.infra.procs.stop_on_signals): finished shards are kept, the lock is released, img2dataset's
processes are ended, and calling `fetch` again with the same options continues where it stopped.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from grr_data.fetch.common import FETCH_MANIFEST, WORK_DIR, FetchError, FetchOptions, summary_lines
from grr_data.infra.lock import LockedError, hold_lock
from grr_data.infra.names import did_you_mean
from grr_data.infra.procs import Interrupted, stop_on_signals

DATASETS = ("cc12m", "mscoco", "roco", "flickr30k", "sample", "shapes")
URL_FETCHES = ("cc12m", "mscoco", "sample")  # may run img2dataset (mscoco: without local image folders)

__all__ = ["DATASETS", "FetchError", "FetchOptions", "Interrupted", "fetch", "summary_lines"]


def fetch(name: str, options: FetchOptions) -> dict:
    """Fetch dataset `name` into `options.out`; returns what was written to `fetch_manifest.json`.

    `options.retry_failed`: a pass over the failed downloads of a finished cc12m fetch instead
    (grr_data.fetch.retry). Ctrl-C or SIGTERM raises `Interrupted`, a KeyboardInterrupt whose
    `signum` and `exit_status` (130, 143) name the signal (img2dataset's own SIGINT handler would
    exit with status 0, and SIGTERM would kill the process outright); finished shards are kept, the
    lock is released and no worker process is left, so calling it again continues. While it runs,
    this process's SIGTERM handler is grr's (called from the main thread; restored on return).
    Another fetch holding `options.out` is a FetchError naming it; `options.break_lock` takes over a
    lock left by a fetch on another host (one left on this host by a process that has ended is
    taken over anyway)."""
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; choose one of {', '.join(DATASETS)}")
    if name != "shapes" and (options.num_pairs is not None or options.seed is not None):
        raise FetchError(f"--num-pairs and --seed are for the generated `shapes` set, not {name}")
    if options.split is not None and name != "mscoco":
        raise FetchError(f"--split is for mscoco (official or karpathy), not {name}")
    if name in URL_FETCHES:  # before any work: a missing distributor or a bad img2dataset option
        from grr_data.fetch.img2ds import check_distributor, parse_passthrough

        check_distributor(options.distributor)
        parse_passthrough(options.img2dataset_options)
    out = Path(options.out)
    created = not out.exists()
    with stop_on_signals(f"the fetch into {out} was interrupted. Finished shards are kept; "
                         "rerun the same command to continue."):
        try:
            with hold_lock(out, f"grr data fetch {name}", options.break_lock):
                return _fetch_locked(name, options)
        except LockedError as err:
            raise FetchError(str(err)) from None
        except BaseException:
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a fetch that failed before writing anything leaves no folder behind
            raise


def _fetch_locked(name: str, options: FetchOptions) -> dict:
    if options.retry_failed:
        from grr_data.fetch.retry import retry_failed

        return retry_failed(name, options)
    module = importlib.import_module(f"grr_data.fetch.{name}")
    done = options.out / FETCH_MANIFEST
    # The manifest is written last, so its presence means a fetch finished: of this dataset?
    data = json.loads(done.read_text()) if done.exists() else None
    if data is not None and data.get("dataset", name) != name:
        raise FetchError(f"{options.out} holds a finished {data['dataset']} fetch, not {name}; choose another --out "
                         "or delete that folder")
    if hasattr(module, "check_options"):  # before "already complete": a folder made with other options
        module.check_options(options)
    if data is not None:
        data.setdefault("warnings", []).append(f"already complete ({done}); delete the folder to fetch again")
        return data
    options.out.mkdir(parents=True, exist_ok=True)
    data = module.fetch(options)
    shutil.rmtree(options.out / WORK_DIR / "download", ignore_errors=True)  # staged images, now in the splits
    return data
