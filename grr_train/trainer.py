"""The training loop: `Trainer.train -> run_epoch -> train_step`, read top to bottom.

One optimizer step takes `accumulation` micro-batches of `micro_batch_size` on each of
`world_size` processes (global batch = their product); the contrastive loss sees each micro-step's
`micro_batch_size x world_size` pairs, `contrastive_batch_size` (192) by default whatever the number
of processes. The step itself (losses, accumulation, clipping, AdamW, the one read-back) is
`grr_train/step.py`.

- An epoch is a whole number of steps: the loader pads the epoch's last step with repeats of the
  plan's first samples (grr_data/loader/plan.py), and they are trained on like the others (a
  repeated pair in a contrastive batch is also a negative of its twin). Validation counts each
  sample once.
- Resuming is exact: the checkpoint holds the loader's position and every rank's RNG states,
  and loader iterators are created inside `fork_rng`, so dropout draws the same numbers whether
  or not a run was interrupted. Processes and collectives live in
  `grr_train/distributed.py`, what is done to the model (DDP or FSDP2, compile) in
  `grr_train/parallel.py`, sharded (FSDP) checkpoints in `grr_train/sharded_checkpoint.py`.
- Stopping: SIGTERM or SIGINT (Ctrl-C) only sets `_signal`. `_stop_signalled` is the one place
  that turns it into `stop_reason` (the one stop state), with every rank agreeing: after each
  step (its flag rides on the step's read-back), between validation batches and after a save.
  The run then saves and exits 0 (an interrupted epoch-end validation is redone on resume). A
  second signal of the same kind is not caught: a second Ctrl-C interrupts at once, a second
  SIGTERM kills.
- `samples_per_s` and `mfu` time the step alone (validation and saves excluded), but the first
  step after a start also holds warm-up (torch.compile, the loader's first batch).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from grr_data.dataset import DatasetInfo
from grr_data.lock import hold_lock
from grr_train import checkpoint as ckpt
from grr_train import run_checks as checks
from grr_train.config import TrainConfig
from grr_train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    init_distributed,
)
from grr_train.early_stop import IMPROVED, RESET, STOP, SoftResetEarlyStopper
from grr_train.metrics_log import MetricsLog, truncate_metrics
from grr_train.model.summary import flops_per_sample
from grr_train.parallel import parallelize, peak_flops, resolve_switch, unwrap
from grr_train.precision import autocast_dtype
from grr_train.run_tokenizer import copy_tokenizer
from grr_train.schedule import lr_at, set_lr
from grr_train.sharded_checkpoint import load_sharded, save_sharded
from grr_train.step import StepSettings, TrainStep
from grr_train.validate import validate


class NonFiniteLoss(RuntimeError):
    pass


def run_training(cfg: TrainConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Entry point for every process: join the group, train, leave. Returns the run summary.

    The main process holds the run folder's lock throughout (grr_data/lock.py), so a second
    trainer on the same folder fails at once naming the first; a restart after the holder died
    takes the lock over.
    """
    info = init_distributed(cfg.process_group_timeout_minutes)
    try:
        lock = hold_lock(run_dir, what=f"grr train {cfg.recipe}", break_lock=cfg.break_lock) \
            if info.is_main else nullcontext()
        with lock:
            return Trainer(cfg, Path(run_dir), info, resume=resume).train()
    finally:
        destroy_distributed()


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, resume: bool = False):
        self.run_dir, self.info = run_dir, info
        latest = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
        if resume and latest is None:
            raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from")
        if not resume and latest is not None:
            raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume, or choose another --out")
        self.data = DatasetInfo.read(cfg.data)
        self.special = self.data.special
        cfg, self._batch_note = checks.fit_batches_to_data(cfg, self.data, info.world_size)
        self.cfg = cfg
        self.device = info.device
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        self.micro_batch_size = cfg.micro_batch_size(info.world_size)
        self.accumulation = cfg.accumulation_steps(info.world_size)
        self._seed_everything(cfg.seed + info.rank)  # ranks differ so their dropout masks differ

        # A step takes all its micro-batches before any GPU work (it needs their token count),
        # so the loader must work at least that far ahead or the GPU waits on decoding.
        self.train_loader = checks.make_loader_for(self, "train", self.micro_batch_size, shuffle=True,
                                                   prefetch=self.accumulation + 1, batch_multiple=self.accumulation)
        self.val_loader = self._make_val_loader()
        self.steps_per_epoch = len(self.train_loader) // self.accumulation  # whole: the plan pads
        cfg, self._epochs_note = checks.fit_epochs_to_max_steps(cfg, self.steps_per_epoch)
        self.cfg = cfg

        model = self._build_model(resume)
        self.sharded = cfg.parallelism == "fsdp"
        compile_mode = checks.compile_mode(cfg, info.device)
        self.model = parallelize(model, info, compile=compile_mode, parallelism=cfg.parallelism,
                                 activation_checkpointing=cfg.activation_checkpointing, param_dtype=self.autocast_dtype,
                                 aligned_widths=resolve_switch("aligned_widths", cfg.aligned_widths, self.device),
                                 inductor_random=cfg.inductor_random)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr_max, betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay, fused=True,
        )
        self.train_step_fn = TrainStep(self.model, self.optimizer, self.special, StepSettings.for_run(
            cfg, self.model_config.temperature, info.world_size, self.autocast_dtype, self.device, compile_mode),
            self.device)
        self.stopper = SoftResetEarlyStopper(cfg.patience_per_level, cfg.num_lr_levels, cfg.lr_reduction)
        self.step = self.epoch = self.step_in_epoch = self.num_skipped = 0
        self.last_saved_step = -1
        self.stop_reason: str | None = None
        self._signal: int | None = None
        self._previous_handlers: dict = {}
        self._loader_state: dict | None = None
        self._events: list[dict] = []  # for metrics.jsonl once it is open
        self.peak = peak_flops(self.device)
        self.flops_per_sample = flops_per_sample(self.model_config)

        # The run carries its tokenizer (run_dir/tokenizer/), so it evaluates and captions elsewhere.
        self.tokenizer_record = self.data.tokenizer.to_dict()
        if resume:
            self._restore(latest)
            self.tokenizer_record = json.loads((run_dir / "config.json").read_text()).get(
                "tokenizer", self.tokenizer_record)
        elif info.is_main:
            # A fresh start in a folder without checkpoints (a run that died before its first
            # save): its metrics are of steps that no longer exist.
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            self.tokenizer_record = copy_tokenizer(run_dir, self.tokenizer_record)
            ckpt.write_run_config(run_dir, self.model_config.to_dict(), cfg.to_dict(), self.special,
                                  self.tokenizer_record)
        barrier()
        # On resume, TensorBoard drops the events past the checkpoint, as truncate_metrics does.
        self.log = MetricsLog(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard,
                              purge_step=self.step + 1 if resume else None)
        self._announce()

    # ---- the loop ------------------------------------------------------------------------

    def train(self) -> dict:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self._previous_handlers = previous
        total = self.cfg.epochs * self.steps_per_epoch
        if self.cfg.max_steps is not None:
            total = min(total, self.cfg.max_steps)
        self.progress = tqdm(total=total, initial=min(self.step, total), disable=not self.info.is_main,
                             desc=f"{self.cfg.recipe} x{self.info.world_size}", unit="step", dynamic_ncols=True)
        try:
            while self.stop_reason is None and self.epoch < self.cfg.epochs:
                self.run_epoch()
            reached_max = self.cfg.max_steps is not None and self.step >= self.cfg.max_steps
            self.stop_reason = self.stop_reason or ("max_steps" if reached_max else "epochs")
            if self.last_saved_step != self.step:
                self.save()
            self.log.log({"kind": "event", "step": self.step, "what": "stop", "reason": self.stop_reason,
                          "epoch": self.epoch, "num_skipped": self.num_skipped,
                          "samples_skipped": self._samples_skipped(), "time": time.time()})
        finally:
            self.progress.close()
            self.log.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        self._check_skipped_fraction()
        return {"step": self.step, "epoch": self.epoch, "stop_reason": self.stop_reason,
                "num_skipped": self.num_skipped, "samples_skipped": self._samples_skipped(),
                "signal": self._signal, "run_dir": str(self.run_dir),
                "best_loss": self.stopper.best if self.cfg.early_stop else None}

    def run_epoch(self) -> None:
        """Train the rest of this epoch, then validate and save; returns early once stop_reason is set."""
        batches = self._epoch_batches()
        last_time = time.perf_counter()
        while self.step_in_epoch < self.steps_per_epoch:
            if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
                self.stop_reason = "max_steps"
                return
            metrics = self.train_step([self._next_batch(batches) for _ in range(self.accumulation)])
            self.step += 1
            self.step_in_epoch += 1
            self._log_train(metrics, time.perf_counter() - last_time)
            if not self._stop_signalled(metrics["stop_requested"]) and self.step_in_epoch < self.steps_per_epoch:
                self._between_steps()
            if self.stop_reason:
                return
            last_time = time.perf_counter()  # after validation and saves: the next step times itself only
        self.end_epoch()

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns the step's global metrics."""
        lr = lr_at(self.step, lr_max=self.cfg.lr_max, lr_min=self.cfg.lr_min, warmup_steps=self.cfg.warmup_steps,
                   cycle_steps=self.cfg.lr_cycle_steps or self.steps_per_epoch, scale=self.stopper.lr_scale)
        set_lr(self.optimizer, lr)
        m = self.train_step_fn(micro_batches, stop_flag=self._signal is not None)
        if not m["finite"]:
            if not self.cfg.skip_nonfinite:
                raise NonFiniteLoss(
                    f"step {self.step + 1}: loss {m['loss']} / gradient norm {m['grad_norm']} is not finite; "
                    f"the last good checkpoint is in {self.run_dir / 'checkpoints'} (set skip_nonfinite=true "
                    "to skip such steps instead)"
                )
            self.num_skipped += 1
            self.log.log({"kind": "event", "step": self.step + 1, "what": "skip_nonfinite", "loss": m["loss"],
                          "grad_norm": m["grad_norm"], "num_skipped": self.num_skipped, "time": time.time()})
        return {**m, "lr": lr}

    def _between_steps(self) -> None:
        """Validation and saves that fall inside an epoch (the epoch's end has its own)."""
        validating = self.val_loader is not None and self.cfg.val_every and self.step % self.cfg.val_every == 0
        saving = self.step % self.cfg.checkpoint_every == 0
        if validating:
            self.run_validation()
        if saving and not self.stop_reason:
            self.save()
        if (validating or saving) and not self.stop_reason:
            self._stop_signalled()  # a signal that came while validating or saving

    def end_epoch(self) -> None:
        result = self.run_validation() if self.val_loader is not None else None
        if self.stop_reason:
            return  # interrupted: train() saves at the epoch's end, validation still to do
        self.epoch += 1
        self.step_in_epoch = 0
        if self.cfg.early_stop:
            self._early_stop(result)
        self.save()
        self._stop_signalled()

    def _early_stop(self, result: dict) -> None:
        if not math.isfinite(result["loss"]):
            raise NonFiniteLoss(
                f"epoch {self.epoch}: the {self.cfg.val_split!r} loss is {result['loss']} (contrastive "
                f"{result['contrastive']} over chunks of {result['contrastive_batch_size']} of its "
                f"{result['num_samples']} samples, caption {result['caption']}), which early stopping cannot "
                f"rank; if the split is smaller than a chunk, lower --set val_contrastive_batch_size=, else "
                f"the model diverged: the last good checkpoint is in {self.run_dir / 'checkpoints'}"
            )
        action = self.stopper.update(result["loss"], self.step)
        self.log.log({"kind": "event", "step": self.step, "what": f"early_stop_{action}", "epoch": self.epoch,
                      "best": self.stopper.best, "level": self.stopper.level,
                      "num_bad_epochs": self.stopper.num_bad_epochs, "time": time.time()})
        if action == IMPROVED:
            self._write(ckpt.checkpoint_folder(self.run_dir, None), [], keep=None)
        elif action == RESET:
            best = ckpt.checkpoint_folder(self.run_dir, None)
            self._load(best, None if self.sharded else ckpt.load_state(best, self.device))
        elif action == STOP:
            self.stop_reason = "early_stop"
        if self.info.is_main and action != "wait":
            tqdm.write(f"step {self.step}: early stopping {action.replace('_', ' ')} (best {self.stopper.best:.4f}, "
                       f"learning-rate level {self.stopper.level + 1} of {self.cfg.num_lr_levels})")

    def run_validation(self) -> dict | None:
        """Validate on the val split and log it; sets stop_reason (and returns None) when a stop
        signal came before it finished."""
        self.val_loader.set_epoch(0)
        bar = tqdm(total=len(self.val_loader), desc="validate", leave=False, disable=not self.info.is_main)
        try:
            with torch.random.fork_rng(devices=[]):
                result = validate(unwrap(self.model), self.val_loader, self.special, self.cfg.lambda_con,
                                  self.cfg.lambda_cap, self.model_config.temperature,
                                  self.cfg.val_contrastive_batch_size, self.autocast_dtype, progress=bar,
                                  should_stop=self._stop_signalled, trim_padding=self.cfg.trim_text_padding,
                                  trim_bucket=self.train_step_fn.settings.trim_bucket)
        finally:
            bar.close()
        if result is None:
            return None
        self.log.log({"kind": "val", "step": self.step, "epoch": self.epoch, "split": self.cfg.val_split,
                      **result, "time": time.time()})
        if self.info.is_main:
            tqdm.write(f"step {self.step} {self.cfg.val_split}: loss {result['loss']:.4f} "
                       f"contrastive {result['contrastive']:.4f} (batch {result['contrastive_batch_size']}) "
                       f"perplexity {result['perplexity']:.2f}")
        return result

    def _stop_signalled(self, any_rank_flagged: bool | None = None) -> bool:
        """Whether a stop signal reached any rank (then stop_reason is "signal"). Every rank calls it
        together; `any_rank_flagged` is the already-agreed flag of a step's read-back."""
        if any_rank_flagged is None:
            flag = torch.tensor([float(self._signal is not None)], dtype=torch.float64, device=self.device)
            any_rank_flagged = all_reduce_sum(flag).item() > 0
        if any_rank_flagged:
            self.stop_reason = "signal"
        return self.stop_reason == "signal"

    def _on_signal(self, signum, _frame) -> None:
        # Only a flag: the loop saves at the next agreed check, on every rank together. The
        # handler from before goes back for this signal, so sending it again is not ignored.
        self._signal = signum
        signal.signal(signum, self._previous_handlers.get(signum, signal.SIG_DFL))

    def _samples_skipped(self) -> dict:
        """Unusable samples the train loaders replaced since this process started, by reason, all ranks."""
        total: dict = {}
        for ranks in all_gather_objects(dict(self.train_loader.skipped)):
            for reason, count in ranks.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def _check_skipped_fraction(self) -> None:
        steps = max(self.step, 1)
        if self.num_skipped and self.num_skipped / steps > self.cfg.max_skipped_fraction:
            raise NonFiniteLoss(
                f"{self.num_skipped} of {self.step} steps had a non-finite loss or gradient and were skipped, "
                f"more than max_skipped_fraction {self.cfg.max_skipped_fraction}: the run saved its state in "
                f"{self.run_dir} but is not healthy (lower lr_max, check the data)"
            )

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self) -> None:
        ranks = all_gather_objects({"rng": ckpt.rng_state(self.device), "loader": self.train_loader.state_dict()})
        if self.info.is_main:
            self.log.sync()  # metrics up to a checkpoint are on disk when it is
        self._write(ckpt.checkpoint_folder(self.run_dir, self.step), ranks, keep=self.cfg.keep_checkpoints)
        self.last_saved_step = self.step

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
            ckpt.load_weights(unwrap(self.model), folder)
            self.optimizer.load_state_dict(state["optimizer"])

    def _state(self, ranks: list[dict]) -> dict:
        return {"early_stop": self.stopper.state_dict(),
                "schedule": {"steps_per_epoch": self.steps_per_epoch, "lr_scale": self.stopper.lr_scale},
                "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "num_skipped": self.num_skipped, "ranks": ranks}

    def _meta(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "world_size": self.info.world_size,
                "micro_batch_size": self.micro_batch_size, "accumulation": self.accumulation,
                "contrastive_batch": self.cfg.contrastive_batch(self.info.world_size),
                "model_config": self.model_config.to_dict(), "train_config": self.cfg.to_dict(),
                "special": self.special.to_dict(), "tokenizer": self.tokenizer_record,
                "time": time.time()}

    def _restore(self, latest: Path) -> None:
        meta = ckpt.read_meta(latest)
        checks.check_same_tokenizer(meta.get("tokenizer"), self.data, f"the run {self.run_dir}",
                                    self.cfg.allow_other_tokenizer)
        if self.info.is_main:
            for path in ckpt.remove_stale_temporaries(self.run_dir):
                tqdm.write(f"removed {path}, left unfinished by a process that died while saving")
        state = ckpt.load_state(latest, self.device)
        if state["schedule"]["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"{latest}: the data now gives {self.steps_per_epoch} steps per epoch, the run "
                             f"had {state['schedule']['steps_per_epoch']}; resume on the same data")
        self._load(latest, state)
        self.stopper.load_state_dict(state["early_stop"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.step_in_epoch, self.num_skipped = state["step_in_epoch"], state["num_skipped"]
        if meta["world_size"] == self.info.world_size:
            mine = state["ranks"][self.info.rank]
            self._loader_state = mine["loader"]
            ckpt.set_rng_state(mine["rng"], self.device)
        else:
            self._resume_on_other_world_size(meta, state)
        self.last_saved_step = self.step
        if self.info.is_main:
            dropped = truncate_metrics(self.run_dir, self.step)
            tqdm.write(f"resumed {self.run_dir} at step {self.step} (epoch {self.epoch}); "
                       f"dropped {dropped} metric records logged after that checkpoint")

    def _resume_on_other_world_size(self, meta: dict, state: dict) -> None:
        """Continue a run saved by another number of processes: not bit-exact (each rank's dropout
        stream is new), but where the contrastive batch is the same the epoch's order is too (the
        plan's order does not depend on the world size), so the epoch continues at the same sample;
        otherwise the current epoch starts again from its beginning."""
        saved_contrastive = meta.get("contrastive_batch")
        same_order = saved_contrastive == self.cfg.contrastive_batch(self.info.world_size)
        where = (f"continuing epoch {self.epoch} at the same sample" if same_order else
                 f"the contrastive batch was {saved_contrastive}, now {self.cfg.contrastive_batch(self.info.world_size)}: "
                 f"restarting epoch {self.epoch} from its beginning")
        if self.info.is_main:
            tqdm.write(f"warning: {self.run_dir} was saved by {meta['world_size']} processes and resumes on "
                       f"{self.info.world_size}: {where}; from here the run is no longer bit-exact")
        if same_order:
            self._loader_state = {**self.train_loader.state_dict(), "epoch": self.epoch,
                                  "batches_done": self.step_in_epoch * self.accumulation}
        else:
            self.step_in_epoch = 0
        self._seed_everything(self.cfg.seed + self.info.rank + 1_000_003 * self.step)
        self._events.append({"kind": "event", "step": self.step, "what": "resume_world_size",
                             "saved_world_size": meta["world_size"], "world_size": self.info.world_size,
                             "same_order": same_order})

    # ---- helpers -------------------------------------------------------------------------

    def _epoch_batches(self):
        if self.step_in_epoch > 0 and self._loader_state is not None:
            self.train_loader.load_state_dict(self._loader_state)  # resume mid-epoch
        else:
            self.train_loader.set_epoch(self.epoch)
        self._loader_state = None
        return iter(self.train_loader)

    def _next_batch(self, batches) -> dict:
        try:
            # A loader may draw from the global RNG (a DataLoader seeds its workers at the first
            # batch); keep that off the dropout stream so a resumed run draws what an unbroken one does.
            with torch.random.fork_rng(devices=[]):
                return next(batches)
        except StopIteration:
            raise RuntimeError(f"{self.cfg.data}: the train loader ran out before its stated "
                               f"{len(self.train_loader)} batches (epoch {self.epoch})") from None

    def _log_train(self, m: dict, seconds: float) -> None:
        samples_per_s = self.cfg.global_batch_size / max(seconds, 1e-9)
        record = {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": m["loss"],
                  "contrastive": m["contrastive"], "caption": m["caption"], "lr": m["lr"],
                  "grad_norm": m["grad_norm"], "samples_per_s": samples_per_s}
        if self.peak is not None:
            record["mfu"] = samples_per_s * self.flops_per_sample / (self.peak * self.info.world_size)
        if self.train_loader.skipped:  # unusable samples this rank's loader replaced, by reason, so far
            record["samples_skipped"] = dict(self.train_loader.skipped)
        record["time"] = time.time()
        self.log.log(record)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", sps=f"{samples_per_s:.1f}")

    def _make_val_loader(self):
        cfg = self.cfg
        num_val = self.data.split_sizes.get(cfg.val_split, 0)
        where = self.data.manifest_path
        if num_val > 0:  # fit_batches_to_data capped its contrastive chunk at num_val: no NaN
            return checks.make_loader_for(self, cfg.val_split, cfg.val_batch_size, shuffle=False)
        if cfg.early_stop:
            raise ValueError(f"{where}: no {cfg.val_split!r} split, which early stopping needs")
        return None

    def _announce(self) -> None:
        """What a user should know before the first step, on the console and in metrics.jsonl."""
        cfg, world = self.cfg, self.info.world_size
        for event in self._events:
            self.log.log({**event, "time": time.time()})
        if not self.info.is_main:
            return
        for note in (self._batch_note, self._epochs_note):
            if note:
                tqdm.write(note)
        tqdm.write(f"batch: global {cfg.global_batch_size} = {self.accumulation} micro-batches x "
                   f"{self.micro_batch_size} per process x {world} process{'es' if world > 1 else ''}; "
                   f"contrastive batch {cfg.contrastive_batch(world)}; {self.steps_per_epoch} steps per epoch")
        if self.val_loader is None:
            extra = f" (val_every {cfg.val_every} is ignored)" if cfg.val_every else ""
            tqdm.write(f"warning: {self.data.manifest_path} has no {cfg.val_split!r} split; training without "
                       f"validation{extra}")
        if self.data.split_mode == "paper":
            overlaps = dict(self.data.overlapping_splits)
            tqdm.write(f"WARNING: {cfg.data} uses the paper split (split_mode 'paper', overlapping "
                       f"{overlaps}): its {cfg.val_split!r} pairs are also training pairs, so validation "
                       "and early stopping on it measure fitting, not generalisation")
            self.log.log({"kind": "event", "step": self.step, "what": "paper_split", "data": cfg.data,
                          "overlapping_splits": overlaps, "time": time.time()})
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            tqdm.write(f"max_steps {cfg.max_steps} already reached (the run is at step {self.step}); "
                       "pass --max-steps M or --set max_steps=none to train further")

    def _build_model(self, resume: bool) -> torch.nn.Module:
        model, self.model_config = checks.build_run_model(self.cfg, self.run_dir, self.data, resume)
        return model

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
