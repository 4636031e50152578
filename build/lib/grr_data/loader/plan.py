"""Which samples each rank reads, in which order, in each epoch: the one plan both loaders follow.

Every sample of a split has a global number 0..N-1 (shards in manifest order, samples in
tar order). An epoch's order is a permutation of 0..N-1 seeded by (seed, epoch), or the
identity when not shuffling. The order is padded to `num_batches * world_size * batch_size`
by repeating its own beginning (cyclically, so it works even when N is smaller than one
global step), and global micro-step s takes the consecutive chunk
`order[s*R*B : (s+1)*R*B]`, of which rank r reads `[r*B : (r+1)*B]`. `num_batches` is rounded
up to a multiple of `batch_multiple` (a trainer's gradient accumulation), so an epoch is a whole
number of optimizer steps and no sample is left out of it.

So in every epoch: every sample is read exactly once, plus `num_padding` repeats (taken from
the start of the permutation) that all fall in the last optimizer step; every rank gets the same
`num_batches`, so DDP ranks never wait on one another, however few shards there are (sharding
is by sample, not by shard). Workers inside a rank split the rank's batches round-robin
(`worker_batches`); the plan does not depend on the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    num_samples: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    batch_multiple: int = 1

    def __post_init__(self):
        if self.num_samples <= 0:
            raise ValueError("the split holds no samples; nothing to load")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.batch_multiple < 1:
            raise ValueError(f"batch_multiple must be at least 1, got {self.batch_multiple}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    @property
    def num_batches(self) -> int:
        """Batches per epoch on every rank."""
        step = self.world_size * self.batch_size
        batches = -(-self.num_samples // step)
        return -(-batches // self.batch_multiple) * self.batch_multiple

    @property
    def num_padding(self) -> int:
        """Repeated samples per epoch, over all ranks together."""
        return self.num_batches * self.world_size * self.batch_size - self.num_samples

    def num_real(self, batch: int) -> int:
        """How many leading samples of this rank's batch `batch` are not padding repeats (for
        metrics that must count every sample once, e.g. validation over a split)."""
        first = (batch * self.world_size + self.rank) * self.batch_size
        return int(min(max(self.num_samples - first, 0), self.batch_size))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The padded global order of an epoch: (num_batches * world_size * batch_size,) int64."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return np.resize(order, self.num_samples + self.num_padding).astype(np.int64)

    def rank_batches(self, epoch: int) -> np.ndarray:
        """This rank's batches of an epoch: (num_batches, batch_size) global sample numbers."""
        steps = self.epoch_order(epoch).reshape(self.num_batches, self.world_size, self.batch_size)
        return np.ascontiguousarray(steps[:, self.rank])


def worker_batches(num_batches: int, worker_id: int, num_workers: int) -> range:
    """The batch numbers one worker makes. Round-robin matches the order in which a torch
    DataLoader collects from its workers, so batches come out in plan order."""
    return range(worker_id, num_batches, max(num_workers, 1))
