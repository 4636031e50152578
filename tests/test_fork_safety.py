"""Forked workers and the parent's garbage: a `grr data check` worker hung for good finalising a
DALI loader an earlier test in the same process had dropped (its pipeline's shutdown waits for
threads that exist only in the parent). Two guards, each tested alone: the worker pool keeps the
parent's objects out of its workers' collector, and a DALI loader never shuts down a pipeline it
inherited through a fork."""

import gc
import os
import signal
import time

import pytest
from shardset import make_shardset

from grr_data.infra.procs import make_pool


class _Finalised:
    """Garbage in a reference cycle that writes the PID of whoever finalises it."""

    def __init__(self, path):
        self.path, self.me = path, self

    def __del__(self):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


def _collect(_item):
    gc.collect()
    return os.getpid()


def test_pool_workers_do_not_finalise_the_parent_s_garbage(tmp_path):
    log = tmp_path / "finalised"
    gc.disable()  # the cycle must still be uncollected when the pool forks
    try:
        _Finalised(log)  # unreachable at once, held only by its own cycle
        with make_pool(_collect, 2) as pool:
            workers = set(pool.imap([0, 1, 2, 3]))
    finally:
        gc.enable()
    gc.collect()  # the parent collects it as usual
    finalisers = {int(pid) for pid in log.read_text().split()}
    assert finalisers == {os.getpid()}, (finalisers, workers)


def _wait_for(pid: int, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.dali
def test_a_forked_child_drops_an_inherited_dali_loader_without_hanging(tmp_path):
    from grr_data.loader import make_loader

    data = make_shardset(tmp_path / "set", (6,))
    loader = make_loader(data, kind="dali", batch_size=2, shuffle=False)
    next(iter(loader))  # a running pipeline with its threads, in this process
    pid = os.fork()
    if pid == 0:  # the child: what a forked worker's collector does to an inherited loader
        try:
            loader.close()
        finally:
            os._exit(0)
    status = _wait_for(pid, 60)
    assert status is not None, "the child hung shutting down its parent's DALI pipeline"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    loader.close()  # the parent's own pipeline still shuts down
