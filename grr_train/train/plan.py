"""A run's batch plan, computed once (`BatchPlan.for_run`) and handed to the loaders, the step,
the checkpoints and the console: how the global batch of one optimizer step is cut.

One optimizer step takes `accumulation` micro-batches of `micro_batch` samples on each of
`world_size` processes (global batch = their product); the contrastive loss sees each micro-step's
`micro_batch x world_size` pairs (the contrastive batch, negatives gathered across processes), 192
by default whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from grr_train.train.config import TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch: int  # samples per micro-batch on each process
    accumulation: int  # micro-batches per optimizer step on each process

    @property
    def contrastive_batch(self) -> int:
        """Pairs in each micro-step's contrastive loss."""
        return self.micro_batch * self.world_size

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all processes together."""
        return self.contrastive_batch * self.accumulation

    @classmethod
    def for_run(cls, cfg: TrainConfig, world_size: int) -> BatchPlan:
        """The plan `cfg` asks for on `world_size` processes; ValueError saying what to change when
        its batches do not divide."""
        micro = micro_batch_for(cfg, world_size)
        contrastive = micro * world_size
        if cfg.global_batch_size % contrastive:
            raise ValueError(
                f"global_batch_size {cfg.global_batch_size} is not a multiple of the contrastive batch "
                f"{contrastive} ({micro} per process x {world_size} processes); change one of them with --set"
            )
        return cls(world_size, micro, cfg.global_batch_size // contrastive)

    def describe(self) -> str:
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return (f"global {self.global_batch} = {self.accumulation} micro-batches x {self.micro_batch} per process x "
                f"{processes}; contrastive batch {self.contrastive_batch}")

    def to_dict(self) -> dict:
        """What a checkpoint's meta.json records of the batch (the names it has always used)."""
        return {"world_size": self.world_size, "micro_batch_size": self.micro_batch,
                "accumulation": self.accumulation, "contrastive_batch": self.contrastive_batch}


def micro_batch_for(cfg: TrainConfig, world_size: int) -> int:
    """Samples per micro-batch on each process: `per_device_batch_size` when set, else the
    contrastive batch shared out over the processes."""
    if cfg.per_device_batch_size is not None:
        return cfg.per_device_batch_size
    if cfg.contrastive_batch_size % world_size:
        raise ValueError(
            f"contrastive_batch_size {cfg.contrastive_batch_size} does not divide over {world_size} "
            f"processes; choose a multiple of {world_size} (--set contrastive_batch_size=) or another "
            "number of processes"
        )
    return cfg.contrastive_batch_size // world_size
