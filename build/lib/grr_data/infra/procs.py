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
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait

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


def usable_cores() -> int:
    """The cores this process may run on (a Slurm job's or container's share, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class WorkerPool:
    """`num_workers` forked processes running `fn`, each busy with at most one item at a time.

    Two ways to use it: `imap(items)` gives results in the items' order; `submit(item, tag)` to an
    idle worker and `next_done()` -> (tag, result) of whichever finishes first, for callers that
    schedule work of several kinds (`grr data shard`: input tars, then the shards built from them).
    One item per worker: the main process sends only to a worker waiting for work, so a large item
    or result never leaves both sides blocked writing to each other.

    Made for `grr data shard` rather than taken from concurrent.futures: its workers must ignore
    stop signals, and a ProcessPoolExecutor whose workers are killed mid-result can hang its
    owner at interpreter exit (its manager thread waits forever on a half-written message). Here
    there is no helper thread: `close()` ends the workers, killing them when asked, and reaps them.
    A worker that dies is reported (RuntimeError naming its PID and how it ended). `fn` is never
    pickled (the workers are forked), so it may be a closure over the caller's data."""

    def __init__(self, fn: Callable, num_workers: int):
        self._workers: list[tuple[int, Connection]] = []
        self._busy: dict[int, object] = {}  # worker number -> tag of the item it holds
        parent = os.getpid()
        # Objects made before the fork are frozen out of the cyclic collector, so no worker
        # finalises the parent's garbage (a DALI pipeline's __del__ there waits forever for threads
        # that exist only in the parent); the parent collects them as usual once unfrozen.
        gc.freeze()
        try:
            for _ in range(num_workers):
                mine, theirs = Pipe()
                pid = os.fork()
                if pid == 0:
                    for _, conn in self._workers:
                        conn.close()
                    mine.close()
                    _serve(fn, theirs, parent)  # never returns
                theirs.close()  # so a dead worker reads as EOF here
                self._workers.append((pid, mine))
        except BaseException:
            self.close(kill=True)
            raise
        finally:
            gc.unfreeze()

    @property
    def num_idle(self) -> int:
        return len(self._workers) - len(self._busy)

    @property
    def num_busy(self) -> int:
        return len(self._busy)

    def submit(self, item, tag=None) -> None:
        """Hand `item` to an idle worker (there must be one: see `num_idle`)."""
        n = next(i for i in range(len(self._workers)) if i not in self._busy)
        pid, conn = self._workers[n]
        try:
            conn.send(item)
        except OSError:  # it died while idle (the OOM killer)
            raise RuntimeError(f"worker process {pid} ended unexpectedly ({self._reap(pid)}); "
                               "rerun the same command to resume") from None
        self._busy[n] = tag

    def next_done(self) -> tuple[object, object]:
        """(tag, result) of the next item to finish; raises what the item raised, or RuntimeError
        naming a worker that died."""
        by_conn = {self._workers[n][1]: n for n in self._busy}
        conn = wait(list(by_conn))[0]
        n = by_conn[conn]
        tag = self._busy.pop(n)
        try:
            ok, value = conn.recv()
        except (EOFError, OSError):
            pid = self._workers[n][0]
            raise RuntimeError(f"worker process {pid} ended unexpectedly ({self._reap(pid)}); "
                               "rerun the same command to resume") from None
        if not ok:
            raise value
        return tag, value

    def imap(self, items: Sequence) -> Iterator:
        """fn over `items`, results in order (at most one item in flight per worker, and at most
        2 x workers results waiting for a slower one before them)."""
        done: dict[int, object] = {}
        sent = 0
        for i in range(len(items)):
            while i not in done:
                while self.num_idle and sent < min(len(items), i + 2 * len(self._workers)):
                    self.submit(items[sent], sent)
                    sent += 1
                tag, value = self.next_done()
                done[tag] = value
            yield done.pop(i)

    def _reap(self, pid: int) -> str:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return "already reaped"
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit status {os.waitstatus_to_exitcode(status)}"

    def close(self, kill: bool = False) -> None:
        """End the workers: let them finish (`kill=False`, after all results were taken) or kill them."""
        for pid, conn in self._workers:
            try:
                if kill:
                    os.kill(pid, signal.SIGKILL)
                else:
                    conn.send(None)
            except (OSError, ProcessLookupError):
                pass
        for pid, conn in self._workers:
            self._reap(pid)
            conn.close()
        self._workers, self._busy = [], {}

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)


class InlinePool:
    """WorkerPool's `submit`/`next_done` for one worker: runs each item in this process when its
    result is asked for (`--workers 1`, and tests that patch functions in-process)."""

    def __init__(self, fn: Callable):
        self._fn = fn
        self._item: tuple | None = None

    @property
    def num_idle(self) -> int:
        return 0 if self._item is not None else 1

    @property
    def num_busy(self) -> int:
        return 1 - self.num_idle

    def submit(self, item, tag=None) -> None:
        assert self._item is None, "InlinePool holds one item at a time"
        self._item = (tag, item)

    def next_done(self) -> tuple[object, object]:
        (tag, item), self._item = self._item, None
        return tag, self._fn(item)

    def imap(self, items: Sequence) -> Iterator:
        return map(self._fn, items)

    def close(self, kill: bool = False) -> None:
        self._item = None

    def __enter__(self) -> InlinePool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def make_pool(fn: Callable, num_workers: int) -> WorkerPool | InlinePool:
    return WorkerPool(fn, num_workers) if num_workers > 1 else InlinePool(fn)


def _serve(fn: Callable, conn: Connection, parent: int) -> None:
    code = 0
    try:
        ignore_stop_signals()
        exit_with_parent(parent)
        while (item := conn.recv()) is not None:
            try:
                result = (True, fn(item))
            except Exception as err:  # noqa: BLE001 - handed to the parent, which raises it
                result = (False, err)
            conn.send(result)
    except BaseException:  # noqa: BLE001 - the parent sees the EOF and reports this worker
        code = 1
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the parent's buffers
