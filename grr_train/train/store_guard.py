"""Every process learns of a data store's failure on any process at the same point: `StoreGuard`,
through which the trainer reads each step's micro-batches and each validation batch.

A set in an object store (s3://, gs://) that stops answering fails on one rank's loader at a time
(grr_data/infra/store.py first retries for GRR_STORE_RETRY_S). Left alone, that rank raises while
the others wait in the step's collectives, and nothing since the last periodic checkpoint is
saved. Through the guard each rank reads, then all ranks add up one failure flag, and when any rank
failed all raise the same StoreError together, before the step's (or validation batch's)
collectives: the trainer then saves the last whole step on every rank (FSDP2's sharded save needs
them all) and stops.

The flag is a CPU tensor summed on a gloo group of its own (`cpu_group`), so reading it never
waits for the GPU (the step's metrics are read back later, on purpose). Cost: one all_reduce of
one number per step and per validation batch, only with a set in a store and several processes; a
local set or a single process reads straight through, as before. The ranks wait in it for the
slowest rank's reads, as they would in the step's collectives; a rank retrying its store keeps them
there up to GRR_STORE_RETRY_S, so process_group_timeout_minutes (this group's timeout too) must be
longer than that budget (torch's defaults, 10 minutes for NCCL and 30 for gloo, are).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from grr_data.infra.store import Location, StoreError, StoreUnavailable, is_remote
from grr_train.runtime.distributed import DistInfo, all_gather_objects, all_reduce_sum, cpu_group

T = TypeVar("T")
_END = object()


class StoreGuard:
    """Reads that every rank makes together, agreeing on a store failure; inert unless `group`."""

    def __init__(self, group=None):
        self.group = group

    @classmethod
    def for_run(cls, data: Location, info: DistInfo, timeout_minutes: float | None = None) -> StoreGuard:
        """The guard of a run on the set at `data` (its root). Every rank calls it together: with a
        set in a store and several processes it makes the gloo group."""
        if info.world_size > 1 and is_remote(data):
            return cls(cpu_group(timeout_minutes))
        return cls()

    @property
    def active(self) -> bool:
        return self.group is not None

    def read(self, read: Callable[[], T]) -> T:
        """`read()`: this rank's reads for one step. Every rank calls it together; when a store
        failed on any rank, every rank raises the same StoreError, naming the rank."""
        if not self.active:
            return read()
        error = None
        try:
            value = read()
        except StoreError as err:
            error = err
        if all_reduce_sum(torch.tensor([error is not None], dtype=torch.int32), self.group).item():
            raise self._agreed(error) from error
        return value

    def batches(self, loader: Iterable[T]) -> Iterable[T]:
        """`loader`'s batches, each read through `read` (validation: every rank has as many)."""
        return self._batches(loader) if self.active else loader

    def _batches(self, loader: Iterable[T]) -> Iterator[T]:
        batches = iter(loader)
        while (batch := self.read(lambda: next(batches, _END))) is not _END:  # the end is agreed on too
            yield batch

    def _agreed(self, error: StoreError | None) -> StoreError:
        """The error all ranks raise: the first failed rank's, as it was (unavailable or refused)."""
        mine = None if error is None else (isinstance(error, StoreUnavailable), str(error))
        failed = [(rank, told) for rank, told in enumerate(all_gather_objects(mine, self.group)) if told]
        rank, (unavailable, message) = failed[0]
        also = f" (ranks {', '.join(str(r) for r, _ in failed)} failed)" if len(failed) > 1 else ""
        return (StoreUnavailable if unavailable else StoreError)(f"rank {rank}: {message}{also}")
