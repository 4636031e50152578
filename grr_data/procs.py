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
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import Pipe
from multiprocessing.connection import Connection

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


class WorkerPool:
    """`num_workers` forked processes running `fn`, results given back in the items' order, at
    most `depth` items in flight per worker (item i goes to worker i % num_workers).

    Made for `grr data shard` rather than taken from concurrent.futures: its workers must ignore
    stop signals, and a ProcessPoolExecutor whose workers are killed mid-result can hang its
    owner at interpreter exit (its manager thread waits forever on a half-written message). Here
    there is no helper thread: `close()` ends the workers, killing them when asked, and reaps them.
    A worker that dies is reported (RuntimeError naming its PID and how it ended)."""

    def __init__(self, fn: Callable, num_workers: int, depth: int = 2):
        self.depth = depth
        self._workers: list[tuple[int, Connection]] = []
        parent = os.getpid()
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

    def imap(self, items: Sequence) -> Iterator:
        n, sent = len(self._workers), 0
        for i in range(len(items)):
            while sent < len(items) and sent < i + self.depth * n:
                self._workers[sent % n][1].send(items[sent])
                sent += 1
            pid, conn = self._workers[i % n]
            try:
                ok, value = conn.recv()
            except (EOFError, OSError):
                raise RuntimeError(f"worker process {pid} ended unexpectedly ({self._reap(pid)}); "
                                   "rerun the same command to resume") from None
            if not ok:
                raise value
            yield value

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
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)


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
