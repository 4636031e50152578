"""How big `grr demo` trains: the CPU plans, or on a GPU a plan sized from the card's memory.

On a CPU the demo trains the tiny presets on a few thousand pairs with one seed (`FULL`, `QUICK`).
On a GPU the same ten minutes buy far more, so it trains larger models on more pairs with three
seeds, and the report shows the spread between seeds and names the card. The card's memory stands
for its class here (a card with 40 GB or more is a data-centre one); the steps of each tier are
our estimate of what fits in about ten minutes, NOT yet measured on a GPU (docs/LOG.md says so):
the models are small enough that memory never binds, speed does, and speed is still to measure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

TINY = ("baseline-tiny-p16", "grr-tiny-p16")
SMALL = ("baseline-small-p16", "grr-small-p16")
GPU_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class DemoPlan:
    num_pairs: int
    pretrain_steps: int
    finetune_steps: int
    batch_size: int = 32
    lr: float = 5e-4  # pretraining peak; fine-tuning peaks at a tenth (the paper: 1e-4, 1e-5)
    caption_tokens: int = 16  # the longest shapes caption is 12 words, one token each
    beams: int = 3  # beam search: 15.5% exact against greedy's 13.0% on the same run (docs/LOG.md)
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 0
    parallel: bool | None = None  # the two models at once; None: on a CPU with two or more cores
    presets: tuple[str, str] = TINY  # (Baseline CoCa's, GRR-CoCa's)
    num_workers: int = 1  # CPU loader workers per run
    device_name: str = "cpu"  # what the report names


FULL = DemoPlan(num_pairs=2000, pretrain_steps=800, finetune_steps=100)
QUICK = DemoPlan(num_pairs=600, pretrain_steps=300, finetune_steps=30, batch_size=16)

# (least card memory in GB, plan): the first tier the card reaches. Estimates, not measured (see above).
GPU_TIERS = (
    (40.0, DemoPlan(num_pairs=20000, pretrain_steps=3000, finetune_steps=300, batch_size=128, presets=SMALL,
                    seeds=GPU_SEEDS, num_workers=6)),
    (16.0, DemoPlan(num_pairs=10000, pretrain_steps=2000, finetune_steps=200, batch_size=64, presets=SMALL,
                    seeds=GPU_SEEDS, num_workers=4)),
    (0.0, DemoPlan(num_pairs=6000, pretrain_steps=2000, finetune_steps=200, batch_size=64, presets=TINY,
                   seeds=GPU_SEEDS, num_workers=4)),
)
# --quick on a GPU: the tier's models and batch, a tenth of its steps and pairs, one seed.
QUICK_FRACTION = 10


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cpu" or "cuda"
    name: str  # "NVIDIA H100 80GB HBM3", or "cpu"
    memory_gb: float  # the card's total memory; 0 on a CPU

    @classmethod
    def of(cls, device: str | torch.device) -> DeviceInfo:
        device = torch.device(device)
        if device.type != "cuda":
            return cls("cpu", "cpu", 0.0)
        props = torch.cuda.get_device_properties(device)
        return cls("cuda", props.name, props.total_memory / 1e9)


def choose_plan(device: DeviceInfo, quick: bool = False, seeds: int | None = None) -> DemoPlan:
    """The demo's plan on `device`; `seeds` (the --seeds option) replaces the plan's seeds when given."""
    if device.type != "cuda":
        plan = QUICK if quick else FULL
    else:
        plan = next(p for least, p in GPU_TIERS if device.memory_gb >= least)
        if quick:
            plan = dataclasses.replace(plan, num_pairs=max(600, plan.num_pairs // QUICK_FRACTION),
                                       pretrain_steps=plan.pretrain_steps // QUICK_FRACTION,
                                       finetune_steps=plan.finetune_steps // QUICK_FRACTION, seeds=(0,))
        plan = dataclasses.replace(plan, device_name=f"{device.name} ({device.memory_gb:.0f} GB)")
    if seeds is not None:
        plan = dataclasses.replace(plan, seeds=tuple(range(seeds)))
    return plan
