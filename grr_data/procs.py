"""Worker processes and stop signals: what the loaders' workers and the sharding pool share.

A stop signal (SIGTERM from Slurm, Kubernetes or `timeout`; SIGINT from Ctrl-C) usually goes
to a whole process group. Workers must not die of it: the main process decides what to do (the
trainer saves a checkpoint and exits; `grr data shard` stops its pool), and a worker killed
first only turns that into `DataLoader worker ... exited unexpectedly`. So workers ignore both.

A worker must also not outlive its main process: a sharding worker whose parent was killed
with SIGKILL would otherwise wait on its task queue forever. On Linux the kernel kills it
(PR_SET_PDEATHSIG); elsewhere a thread watches the parent's PID.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def ignore_stop_signals() -> None:
    """In a worker: leave SIGTERM and SIGINT to the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_worker_init(worker_id: int) -> None:
    """`worker_init_fn` of the CPU loader's DataLoader (torch's own watchdog ends a worker whose
    parent is gone)."""
    ignore_stop_signals()


def exit_with_parent(parent_pid: int) -> None:
    """End this process (SIGKILL) as soon as `parent_pid`, the process that forked it, is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # it died before the prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="grr-parent-watch", daemon=True).start()


def pool_worker_setup(parent_pid: int) -> None:
    """`initializer` of the sharding pool's workers."""
    ignore_stop_signals()
    exit_with_parent(parent_pid)


def stop_pool(pool) -> None:
    """Stop a ProcessPoolExecutor now: cancel queued work and kill its workers (they ignore
    SIGTERM, and waiting for their current tars could take minutes)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=10)
