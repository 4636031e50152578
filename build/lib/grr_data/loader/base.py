"""What both loaders share: the output contract, the epoch position, skip accounting.

Output (CONTRACTS.md "Loader"): `images` (B, 3, 288, 288) in the requested float dtype,
resized bilinearly to 288x288 (aspect not kept, paper 3.2), scaled to [0, 1] and normalised
with the ImageNet mean and std; `ids` (B, 65) int64; `real` (B,) bool on the CPU: True where
the slot holds its own sample, read for the first time this epoch; False for the plan's
padding repeats (`Plan.num_real`) and for substitutes of unusable samples (below), so
split-level metrics count every usable sample exactly once; `keys` when asked for.

Position: `epoch` and `batches_done` (batches of this epoch already handed out). Iterating
yields the epoch's batches from `batches_done` on and then moves to the next epoch, so a
loader restored with `load_state_dict` yields exactly what an uninterrupted one would have.
`set_epoch(e)` starts epoch e from its first batch unless e is already the current epoch
(so a trainer that calls it after restoring keeps the restored position).

A sample that cannot be used (it fails its checksum or the vocabulary check when read, see
`source.py`, or does not decode) is counted in `skipped` ({reason: count}, every time it is met
since the loader was made: what a trainer writes into its metrics), logged with its shard and
key at a bounded rate, and replaced, inside its batch, by the next usable sample of the
same batch (cyclically); when no sample of a batch is usable, by the first usable sample after
it in the rank's plan. Batches keep their shape and ranks stay in step.

Subclasses yield each batch with `nums` (B,) int64: the global sample number each slot holds.
A slot is real when it holds the sample the plan put there (a substitute is always another
sample: the one it replaces is unusable) and that slot is not padding.

No usable sample at all: when no sample of a rank's whole plan can be used, that rank raises
RuntimeError and the other ranks are not told. Under `torchrun` (how `grr train` starts
several processes) its agent sees the failed process and stops the others within seconds
(checked: a rank raising while the other waits in an all_reduce ends the run with exit code
1 in ~6 s); in a process group started any other way the other ranks wait in their next
collective until its timeout. Telling them would cost a collective per batch for a set that
is broken anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from grr_data.infra.skips import SkipLog
from grr_data.loader.plan import Plan

IMAGE_SIZE = 288
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

log = logging.getLogger("grr.loader")
T = TypeVar("T")


def normalize(images_u8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) `dtype`, ImageNet-normalised; runs where the input lives."""
    dev = images_u8.device
    scale = 1 / (torch.tensor(STD, device=dev).view(1, 3, 1, 1) * 255)
    shift = -torch.tensor(MEAN, device=dev).view(1, 3, 1, 1) / torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    # Reordering the uint8 bytes first and one fused multiply-add: ~3.5x less CPU than (x - m) / s.
    chw = images_u8.permute(0, 3, 1, 2).contiguous()
    return torch.addcmul(shift, chw.float(), scale).to(dtype)


def fill_batch(slots: Sequence[T | None], fallback: Callable[[], T]) -> list[T]:
    """Replace each None by the next non-None slot (cyclically); all None: fallback() for all."""
    good = [i for i, s in enumerate(slots) if s is not None]
    if not good:
        sub = fallback()
        return [sub] * len(slots)
    out = []
    for i, s in enumerate(slots):
        if s is None:
            s = slots[next((j for j in good if j > i), good[0])]
        out.append(s)
    return out


def plan_after(batches, after: int):
    """The rank's plan (`batches` (num_batches, B)) flattened, starting at the batch after `after`:
    where a batch none of whose samples is usable takes its substitute from."""
    return np.roll(batches.reshape(-1), -(after + 1) * batches.shape[1])


class LoaderBase:
    """Position, state and bookkeeping; subclasses implement `_iter_batches(batches, start)`."""

    name = "base"

    def __init__(self, shards, plan: Plan, device: str, dtype: torch.dtype, with_keys: bool):
        self.shards, self.plan = shards, plan
        self.device, self.dtype, self.with_keys = torch.device(device), dtype, with_keys
        self.special = shards.special
        self.epoch, self.batches_done = 0, 0
        self._skips = SkipLog(log)

    @property
    def skipped(self) -> dict[str, int]:
        """Unusable samples met so far, by reason (checksum_mismatch, ids_out_of_vocab, decode_error, ...)."""
        return dict(self._skips.counts)

    def __len__(self) -> int:
        return self.plan.num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def state_dict(self) -> dict:
        p = self.plan
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": p.seed,
            "shuffle": p.shuffle,
            "batch_size": p.batch_size,
            "world_size": p.world_size,
            "num_samples": p.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        p = self.plan
        mine = {
            "seed": p.seed,
            "shuffle": p.shuffle,
            "batch_size": p.batch_size,
            "world_size": p.world_size,
            "num_samples": p.num_samples,
        }
        changed = {k: (state[k], v) for k, v in mine.items() if k in state and state[k] != v}
        if changed:
            raise ValueError(
                f"loader state was saved with a different plan {changed} (saved, now): the remaining "
                "batches cannot be reproduced; start the epoch afresh with set_epoch instead"
            )
        if not 0 <= state["batches_done"] <= p.num_batches:
            raise ValueError(f"batches_done {state['batches_done']} is outside 0..{p.num_batches}")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    def __iter__(self):
        self.shards.load_indexes()
        batches = self.plan.rank_batches(self.epoch)
        inner = self._iter_batches(batches, self.batches_done)
        try:
            for batch in inner:
                nums = batch.pop("nums")  # (B,) int64, CPU
                own = nums == torch.from_numpy(batches[self.batches_done])
                batch["real"] = own & (torch.arange(len(nums)) < self.plan.num_real(self.batches_done))
                if self.with_keys:
                    batch["keys"] = [self.shards.key(int(g)) for g in nums]
                self.batches_done += 1
                yield batch
        finally:
            # An epoch closed part way (max_steps, an error in the step) closes the subclass's
            # iteration here, at once, so its readers stop now: left to the garbage collector
            # (CPython 3.12 on an H200 machine kept it alive past the close) they outlived the epoch.
            inner.close()
        self.epoch, self.batches_done = self.epoch + 1, 0

    def _iter_batches(self, batches, start: int):
        raise NotImplementedError
