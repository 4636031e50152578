"""A run's batch plan, computed once (`BatchPlan.for_run`) and handed to the loaders, the step,
the checkpoints and the console: how the global batch of one optimizer step is cut.

One optimizer step takes `accumulation` micro-batches of `micro_batch` samples on each of
`world_size` processes (global batch = their product). A micro-batch holds `groups` contrastive
groups (`micro_batch_groups`, 1 by default; 2 gives micro-batch 384 whose maths equals two
micro-batches of 192); each group's contrastive loss sees its share times `world_size` pairs (the
contrastive batch, negatives gathered across processes), 192 by default whatever the number of
processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from grr_train.train.config import TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch: int  # samples per micro-batch on each process
    accumulation: int  # micro-batches per optimizer step on each process
    groups: int = 1  # contrastive groups per micro-batch

    @property
    def contrastive_batch(self) -> int:
        """Pairs in each contrastive loss (one group of a micro-step, all processes)."""
        return self.micro_batch // self.groups * self.world_size

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all processes together."""
        return self.contrastive_batch * self.accumulation

    @classmethod
    def for_run(cls, cfg: TrainConfig, world_size: int) -> BatchPlan:
        """The plan `cfg` asks for on `world_size` processes; ValueError saying what to change when
        its batches do not divide."""
        share = micro_batch_for(cfg, world_size)
        groups = cfg.micro_batch_groups
        per_micro_step = share * world_size * groups
        if cfg.global_batch_size % per_micro_step:
            in_groups = f" x {groups} groups per micro-batch" if groups > 1 else ""
            raise ValueError(
                f"global_batch_size {cfg.global_batch_size} is not a multiple of the contrastive batch "
                f"{share * world_size}{in_groups} ({share} per process x {world_size} processes); change one "
                "of them with --set"
            )
        return cls(world_size, share * groups, cfg.global_batch_size // per_micro_step, groups)

    def describe(self) -> str:
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        groups = f" ({self.groups} contrastive groups each)" if self.groups > 1 else ""
        return (f"global {self.global_batch} = {self.accumulation} micro-batches x {self.micro_batch} per process"
                f"{groups} x {processes}; contrastive batch {self.contrastive_batch}")

    def to_dict(self) -> dict:
        """What a checkpoint's meta.json records of the batch (the names it has always used)."""
        return {"world_size": self.world_size, "micro_batch_size": self.micro_batch,
                "accumulation": self.accumulation, "contrastive_batch": self.contrastive_batch,
                "contrastive_groups": self.groups}


def micro_batch_for(cfg: TrainConfig, world_size: int) -> int:
    """Each process's share of one contrastive batch (a micro-batch holds `micro_batch_groups` of
    them): `per_device_batch_size` when set, else the contrastive batch shared out over the processes."""
    if cfg.per_device_batch_size is not None:
        return cfg.per_device_batch_size
    if cfg.contrastive_batch_size % world_size:
        raise ValueError(
            f"contrastive_batch_size {cfg.contrastive_batch_size} does not divide over {world_size} "
            f"processes; choose a multiple of {world_size} (--set contrastive_batch_size=) or another "
            "number of processes"
        )
    return cfg.contrastive_batch_size // world_size
