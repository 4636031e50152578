"""Worker processes and stop signals: what the loaders' workers, the sharding pool and the fetch share.

A stop signal (SIGTERM from Slurm, Kubernetes or `timeout`; SIGINT from Ctrl-C) usually goes
to a whole process group. Workers must not die of it: the main process decides what to do (the
trainer saves a checkpoint and exits; `grr data shard` and `grr data fetch` stop their pools), and
a worker killed first only turns that into `DataLoader worker ... exited unexpectedly`. So workers
ignore both. A job that simply stops on either (`grr data shard`, `grr data fetch`) runs inside
`stop_on_signals`: SIGTERM then stops it as Ctrl-C does, and it ends in `Interrupted`, naming the
signal and the exit status a shell reports for it (130, 143).

A worker must also not outlive its main process: a sharding worker whose parent was killed
with SIGKILL would otherwise wait on its task queue forever. On Linux the kernel kills it
(PR_SET_PDEATHSIG); elsewhere a thread watches the parent's PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
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
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def ignore_stop_signals() -> None:
    """In a worker: leave SIGTERM and SIGINT to the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the work: `signum` (SIGINT or SIGTERM), and `exit_status`, 128 + signum,
    what a shell reports for a process the signal ended and what schedulers expect (130, 143). A
    KeyboardInterrupt, so code that handles Ctrl-C handles it too."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + self.signum
        super().__init__(f"stopped by {self.signal_name}" + (f": {message}" if message else ""))


@contextlib.contextmanager
def stop_on_signals(message: str = "") -> Iterator[None]:
    """For the block, SIGTERM stops the work as Ctrl-C does, and either ends it in `Interrupted`
    (its text: "stopped by SIGTERM: " + `message`).

    SIGTERM runs whatever handles SIGINT at that moment: Python's own KeyboardInterrupt, or a
    library's handler (img2dataset's removes its temporary folder and ends its logger process
    before it exits), so what a stop cleans up is the same for both signals; then, should that
    handler have returned, KeyboardInterrupt. Only the first SIGTERM is taken so: it puts back the
    handler there was before, so a second one does what it did before (by default, it kills), as
    a trainer's second signal does. Outside the main thread no handler can be set, and the block
    runs as it is. The previous SIGTERM handler is restored on leaving the block."""
    received: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: set outside Python
    try:
        signal.signal(signal.SIGTERM, functools.partial(_stop, received=received, previous=previous))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    except Interrupted:
        raise  # an inner block already named the signal
    except KeyboardInterrupt as err:
        raise Interrupted(received[0] if received else signal.SIGINT, message) from err
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(signum: int, frame, *, received: list[int], previous) -> None:
    received.append(signum)
    signal.signal(signal.SIGTERM, previous)
    on_sigint = signal.getsignal(signal.SIGINT)
    if callable(on_sigint):
        on_sigint(signal.SIGINT, frame)
    raise KeyboardInterrupt


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

    Made for `grr data shard` and img2dataset's shards in `grr data fetch` rather than taken from
    concurrent.futures or multiprocessing.Pool: their workers must ignore stop signals, and a
    ProcessPoolExecutor whose workers are killed mid-result can hang its owner at interpreter exit
    (its manager thread waits forever on a half-written message), a Pool whose worker died waiting
    for work hangs in terminate() (docs/LOG.md). Here there is no helper thread and no lock shared
    with the workers: `close()` ends the workers, killing them when asked, and reaps them. A worker
    that dies is reported (RuntimeError naming its PID and how it ended). `fn` is never pickled
    (the workers are forked), so it may be a closure over the caller's data.
    `max_items_per_worker`: a worker that has done that many items is replaced by a fresh one (what
    multiprocessing.Pool's maxtasksperchild does: memory a library leaks per item is given back)."""

    def __init__(self, fn: Callable, num_workers: int, max_items_per_worker: int | None = None):
        self._fn, self._parent, self._max_items = fn, os.getpid(), max_items_per_worker
        self._workers: list[tuple[int, Connection]] = []
        self._busy: dict[int, object] = {}  # worker number -> tag of the item it holds
        self._num_done: list[int] = []  # items finished per worker number, since it was forked
        try:
            for _ in range(num_workers):
                self._workers.append(self._fork())
                self._num_done.append(0)
        except BaseException:
            self.close(kill=True)
            raise

    def _fork(self) -> tuple[int, Connection]:
        mine, theirs = Pipe()
        # Objects made before the fork are frozen out of the cyclic collector, so no worker
        # finalises the parent's garbage (a DALI pipeline's __del__ there waits forever for threads
        # that exist only in the parent); the parent collects them as usual once unfrozen.
        gc.freeze()
        # Stop signals wait while forking: a child must not run this process's handler (and
        # unwind its copy of this process's stack) before it ignores them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _start_worker(self._fn, mask, [conn for _, conn in self._workers] + [mine], theirs, self._parent)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            gc.unfreeze()
        theirs.close()  # so a dead worker reads as EOF here
        return pid, mine

    def _replace(self, n: int) -> None:
        """Worker `n` has done its `max_items_per_worker`: end it, fork a fresh one in its place."""
        pid, conn = self._workers[n]
        try:
            conn.send(None)
        except OSError:
            pass
        self._reap(pid)
        conn.close()
        self._workers[n] = self._fork()
        self._num_done[n] = 0

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
        self._num_done[n] += 1
        if self._max_items is not None and self._num_done[n] >= self._max_items:
            self._replace(n)
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
        self._workers, self._busy, self._num_done = [], {}, []

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


def _start_worker(fn: Callable, mask: set, parents_ends: list[Connection], conn: Connection, parent: int) -> None:
    try:
        ignore_stop_signals()  # and discard any that came to this child while they were blocked
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for end in parents_ends:
            end.close()
    except BaseException:  # noqa: BLE001 - never back into the parent's stack
        os._exit(1)
    _serve(fn, conn, parent)  # never returns


def _serve(fn: Callable, conn: Connection, parent: int) -> None:
    code = 0
    try:
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
