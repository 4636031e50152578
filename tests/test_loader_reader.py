"""BatchReader: order, and close() ends its thread at once (or says where it is stuck)."""

import gc
import logging
import threading
import weakref

import pytest

from grr_data.loader import reader as reader_mod
from grr_data.loader.reader import BatchReader


def alive(name):
    return [t for t in threading.enumerate() if t.name == name]


def test_reader_gives_batches_in_order_and_stop_iteration_at_the_end():
    r = BatchReader(lambda b: b * 10, 3, 6, depth=2, name="t-order")
    assert [r.get(3), r.get(4), r.get(5)] == [30, 40, 50]
    with pytest.raises(StopIteration):
        r.get(6)
    with pytest.raises(RuntimeError, match="next one in order"):
        BatchReader(lambda b: b, 0, 3, depth=1, name="t-order").get(1)
    r.close()


def test_close_with_a_full_queue_ends_the_thread_before_returning():
    r = BatchReader(lambda b: b, 0, 1000, depth=2, name="t-full")
    assert r.get(0) == 0  # the thread is now waiting on a full queue
    assert len(alive("t-full")) == 1
    r.close()
    assert not alive("t-full")  # joined by close itself: no sleep here
    r.close()  # twice is fine


def test_close_names_where_a_blocked_read_is_stuck(monkeypatch, caplog):
    release = threading.Event()

    def stuck_reading(b):
        release.wait()
        return b

    monkeypatch.setattr(reader_mod, "_JOIN_S", 0.2)
    r = BatchReader(stuck_reading, 0, 5, depth=1, name="t-stuck")
    with caplog.at_level(logging.WARNING, logger="grr.loader"):
        r.close()
    assert "t-stuck did not stop within" in caplog.text and "stuck_reading" in caplog.text
    release.set()
    r.close()
    assert not alive("t-stuck")


def test_an_error_is_raised_without_a_reference_cycle():
    """The error a read raised reaches the consumer, and once dropped it takes everything its
    frames held with it at once (a cycle through the traceback would leave that to the garbage
    collector, which may run it on any thread)."""

    class Held:
        pass

    def failing(b):
        held = Held()  # noqa: F841 - held by this frame, hence by the error's traceback
        holder.append(weakref.ref(held))
        raise OSError(f"batch {b} unreadable")

    holder = []
    r = BatchReader(failing, 0, 3, depth=1, name="t-error")
    gc.disable()
    try:
        with pytest.raises(OSError, match="batch 0 unreadable"):
            r.get(0)
        r.close()
        assert holder and holder[0]() is None
    finally:
        gc.enable()
    assert not alive("t-error")


def test_close_stops_a_reader_whose_items_are_never_taken():
    reads = []
    r = BatchReader(lambda b: reads.append(b) or b, 0, 10_000, depth=1, name="t-untaken")
    r.close()
    assert not alive("t-untaken")
    assert len(reads) <= 3  # stopped at once: the queue's one item, one in hand, no more


def test_a_reader_dropped_without_close_stops_its_thread():
    r = BatchReader(lambda b: b, 0, 10_000, depth=1, name="t-dropped")
    thread = r._thread
    del r  # the thread holds only what it reads with, so the reader is collected at once
    thread.join(timeout=5)
    assert not thread.is_alive()
