"""BatchReader: order, and close() ends its thread at once (or says where it is stuck)."""

import logging
import threading

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
