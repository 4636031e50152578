"""A background thread that prepares a rank's batches in plan order, a bounded number ahead.

The DALI loader's `external_source` callback runs on the training thread; reading a 48-sample
batch there (`os.pread`, ~1.3 ms) is time the GPU may wait. `os.pread` releases the GIL, so this
thread does the reads ahead into a bounded queue and the callback only takes the next item.
Items come strictly in batch order from `start`: each epoch, a resumed epoch, or the rebuild
after a failed batch starts a new reader at its batch, so what is read never depends on timing.
`close()` stops and joins the thread (an abandoned epoch leaves none behind).

The thread holds only what it reads with (`make`, the queue, the stop flag), not the reader, and
checks the stop flag before every batch and every 0.1 s while the queue is full. The one place it
cannot see the flag is inside `make` (a read blocked on a hung filesystem; or Python's cyclic
garbage collector, which runs on whichever thread is executing Python when it triggers, so
finalizers of unrelated objects can run on this thread): `close()` then waits up to `_JOIN_S` and
logs the thread's stack (`thread_stacks`), which names where it is.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_POLL_S = 0.1
_JOIN_S = 30  # a batch is read in milliseconds; only a blocked read takes longer
log = logging.getLogger("grr.loader")


def thread_stacks(name: str) -> dict[int, str]:
    """{thread id: its Python stack} of every live thread called `name` (for diagnostics)."""
    frames = sys._current_frames()
    out = {}
    for t in threading.enumerate():
        if t.name == name and t.ident is not None:
            frame = frames.get(t.ident)
            out[t.ident] = "".join(traceback.format_stack(frame)) if frame is not None else "(no Python frame)\n"
    return out


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    # A timed put, so close() never waits on a full queue nobody reads any more.
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _run(make: Callable[[int], T], q: queue.Queue, stop: threading.Event, start: int, end: int) -> None:
    for b in range(start, end):
        if stop.is_set():  # closed: read nothing more
            return
        try:
            item = (b, make(b), None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            _put(q, stop, (b, None, err))
            return
        if not _put(q, stop, item):
            return


class BatchReader(Generic[T]):
    """Calls `make(b)` for b = start .. stop-1 on a daemon thread; `get(b)` returns them in order."""

    def __init__(
        self, make: Callable[[int], T], start: int, stop: int, depth: int, name: str = "grr-batch-reader"
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._next, self._end = start, stop
        self._thread = threading.Thread(
            target=_run, args=(make, self._queue, self._stop, start, stop), name=name, daemon=True
        )
        self._thread.start()

    def get(self, b: int) -> T:
        """The item of batch b, which must be the next one; StopIteration from `stop` on."""
        if b >= self._end:
            raise StopIteration
        if b != self._next:
            raise RuntimeError(
                f"batch reader: asked for batch {b}, but the next one in order is {self._next}"
            )
        while True:
            try:
                got, item, err = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("batch reader: the reading thread ended early") from None
        if err is not None:
            try:
                raise err
            finally:  # the frame must not keep the error it raised (a cycle through its traceback)
                del err
        self._next = got + 1
        return item

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __del__(self):
        # Dropped without close(): the thread, which does not hold this object, ends after the batch in hand.
        if "_stop" in self.__dict__:
            self._stop.set()

    def close(self) -> None:
        """Stop the thread and drop what it read ahead; returns once the thread has ended. The
        queue is emptied while waiting (a put blocked on a full queue always completes), so this
        waits only for the batch being read; a warning with the thread's stack if that takes more
        than 30 s. Safe to call more than once."""
        self._stop.set()
        self._drain()
        # At interpreter exit daemon threads are frozen and never end: joining one would hang.
        if self._thread is threading.current_thread() or sys.is_finalizing():
            return
        deadline = time.monotonic() + _JOIN_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(timeout=_POLL_S)
            self._drain()
        if self._thread.is_alive():  # a read blocked that long (a hung filesystem): say where
            frame = sys._current_frames().get(self._thread.ident)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"
            log.warning(
                "%s did not stop within %d s of close; it is at:\n%s", self._thread.name, _JOIN_S, where
            )
