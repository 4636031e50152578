"""What a training checkpoint holds beyond the run folder's conventions (grr_train/runs/), kept
beside the Trainer so the trainer file holds the loop: where the run is (`Progress`), and the
`RunState` that saves and restores everything a resumed run needs to continue bit for bit.

A checkpoint saves the model and optimizer (whole by the main process, or sharded by every
process under FSDP2), the progress (with whether a stop interrupted the step's validation), the
early stopper, the schedule's steps per epoch and lr scale, and per rank the loader position and
RNG states; `meta.json` records the batch plan, both configs, the special ids and the tokenizer.
Resuming on the same number of processes is exact; on another number, the epoch continues at the
same sample where the contrastive batch is the same (the plan's order does not depend on the
world size), and restarts otherwise.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from grr_data.format.manifest import Manifest
from grr_data.loader import LoaderBase
from grr_train.runs import checkpoint as ckpt
from grr_train.runs.rng import rng_state, set_rng_state
from grr_train.runs.sharded import load_sharded, save_sharded
from grr_train.runs.weights import load_weights
from grr_train.runtime.distributed import DistInfo, all_gather_objects, barrier
from grr_train.runtime.parallel import unwrap
from grr_train.train.early_stop import SoftResetEarlyStopper
from grr_train.train.plan import BatchPlan
from grr_train.train.setup import check_same_tokenizer


@dataclass
class Progress:
    """Where a run is; every rank holds the same."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # whole epochs done
    step_in_epoch: int = 0
    num_skipped: int = 0  # steps skipped for a non-finite loss or gradient
    # A stop came before this step's in-epoch validation (`val_every`) finished: the resumed run
    # validates the step before its next one (an epoch-end validation needs no flag: a checkpoint
    # with step_in_epoch == steps_per_epoch is one whose epoch end is still to do).
    validation_pending: bool = False


@dataclass
class Resumed:
    """What `RunState.restore` found that the loop acts on."""

    loader_state: dict | None  # this rank's loader position, None when the epoch restarts
    reseed: int | None  # a new seed for this rank, when the world size changed
    events: list[dict]  # for metrics.jsonl once it is open


class RunState:
    """Saves and restores a run's whole training state through its checkpoint folders."""

    def __init__(self, run_dir: Path, info: DistInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 progress: Progress, stopper: SoftResetEarlyStopper, loader: LoaderBase, plan: BatchPlan,
                 steps_per_epoch: int, sharded: bool, describe_run: dict):
        self.run_dir, self.info, self.model, self.optimizer = run_dir, info, model, optimizer
        self.progress, self.stopper, self.loader, self.plan = progress, stopper, loader, plan
        self.steps_per_epoch, self.sharded = steps_per_epoch, sharded
        self.describe_run = describe_run  # model_config, train_config, special, tokenizer: for meta.json
        self.last_saved_step = -1

    # ---- saving ----------------------------------------------------------------------------

    def save(self, keep: int) -> None:
        """`checkpoints/step-NNNNNNN` of the current step (every rank calls it together)."""
        ranks = all_gather_objects({"rng": rng_state(self.info.device), "loader": self.loader.state_dict()})
        self._write(ckpt.checkpoint_folder(self.run_dir, self.progress.step), ranks, keep)
        self.last_saved_step = self.progress.step

    def save_best(self) -> None:
        """The run's `best/` (early stopping's reference)."""
        self._write(ckpt.checkpoint_folder(self.run_dir, None), [], keep=None)

    def load_best(self) -> None:
        """Weights and optimizer back from `best/` (early stopping's soft reset)."""
        best = ckpt.checkpoint_folder(self.run_dir, None)
        self._load(best, None if self.sharded else ckpt.load_state(best, self.info.device))

    def _write(self, final: Path, ranks: list[dict], keep: int | None) -> None:
        """Save the checkpoint folder `final`: sharded by every process, or whole by the main one."""
        if self.sharded:
            save_sharded(final, self.model, self.optimizer, self._state(ranks), self._meta(), keep)
        elif self.info.is_main:
            state = {"optimizer": self.optimizer.state_dict(), **self._state(ranks)}
            ckpt.save_whole(final, unwrap(self.model), state, self._meta(), keep)
        barrier()

    def _load(self, folder: Path, state: dict | None) -> None:
        """Weights and optimizer from the checkpoint `folder` (`state`: its state.pt, when whole)."""
        if self.sharded:
            load_sharded(folder, self.model, self.optimizer)
        else:
            load_weights(unwrap(self.model), folder)
            self.optimizer.load_state_dict(state["optimizer"])

    def _state(self, ranks: list[dict]) -> dict:
        return {"early_stop": self.stopper.state_dict(),
                "schedule": {"steps_per_epoch": self.steps_per_epoch, "lr_scale": self.stopper.lr_scale},
                **asdict(self.progress), "ranks": ranks}

    def _meta(self) -> dict:
        return {"step": self.progress.step, "epoch": self.progress.epoch, **self.plan.to_dict(),
                **self.describe_run, "time": time.time()}

    # ---- restoring -------------------------------------------------------------------------

    def restore(self, latest: Path, data: Manifest, allow_other_tokenizer: bool, seed: int) -> Resumed:
        """Load the checkpoint `latest` into the model, optimizer, stopper and progress; returns this
        rank's loader position and what else the loop must do."""
        meta = ckpt.read_meta(latest)
        check_same_tokenizer(meta.get("tokenizer"), data, f"the run {self.run_dir}", allow_other_tokenizer)
        if self.info.is_main:
            for path in ckpt.remove_stale_temporaries(self.run_dir):
                tqdm.write(f"removed {path}, left unfinished by a process that died while saving")
        state = ckpt.load_state(latest, self.info.device)
        if state["schedule"]["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"{latest}: the data now gives {self.steps_per_epoch} steps per epoch, the run "
                             f"had {state['schedule']['steps_per_epoch']}; resume on the same data")
        self._load(latest, state)
        self.stopper.load_state_dict(state["early_stop"])
        for name, default in asdict(Progress()).items():
            setattr(self.progress, name, state.get(name, default))  # a field newer than the checkpoint: its default
        self.last_saved_step = self.progress.step
        if meta["world_size"] == self.info.world_size:
            mine = state["ranks"][self.info.rank]
            set_rng_state(mine["rng"], self.info.device)
            return Resumed(mine["loader"], None, [])
        return self._on_other_world_size(meta, seed)

    def _on_other_world_size(self, meta: dict, seed: int) -> Resumed:
        """Continue a run saved by another number of processes: not bit-exact (each rank's dropout
        stream is new), but where the contrastive batch is the same the epoch's order is too, so the
        epoch continues at the same sample; otherwise the current epoch starts again."""
        progress, plan = self.progress, self.plan
        saved_contrastive = meta.get("contrastive_batch")
        same_order = saved_contrastive == plan.contrastive_batch
        where = (f"continuing epoch {progress.epoch} at the same sample" if same_order else
                 f"the contrastive batch was {saved_contrastive}, now {plan.contrastive_batch}: "
                 f"restarting epoch {progress.epoch} from its beginning")
        if self.info.is_main:
            tqdm.write(f"warning: {self.run_dir} was saved by {meta['world_size']} processes and resumes on "
                       f"{self.info.world_size}: {where}; from here the run is no longer bit-exact")
        loader_state = None
        if same_order:
            loader_state = {**self.loader.state_dict(), "epoch": progress.epoch,
                            "batches_done": progress.step_in_epoch * plan.accumulation}
        else:
            progress.step_in_epoch = 0
        event = {"kind": "event", "step": progress.step, "what": "resume_world_size",
                 "saved_world_size": meta["world_size"], "world_size": self.info.world_size, "same_order": same_order}
        return Resumed(loader_state, seed + self.info.rank + 1_000_003 * progress.step, [event])
