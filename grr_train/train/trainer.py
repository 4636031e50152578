"""The training loop: `Trainer.train -> run_epoch -> train_step`, read top to bottom.

The batches are the run's `BatchPlan` (grr_train/train/plan.py: micro-batch, accumulation,
contrastive and global batch, computed once); the step itself (losses, accumulation, clipping,
AdamW, the one read-back) is `grr_train/train/step.py`; what a checkpoint saves and restores is
`grr_train/train/state.py`; what a run checks and builds before its first step is
`grr_train/train/setup.py`.

- An epoch is a whole number of steps: the loader pads the epoch's last step with repeats of the
  plan's first samples (grr_data/loader/plan.py), and they are trained on like the others (a
  repeated pair in a contrastive batch is also a negative of its twin). Validation counts each
  sample once.
- Resuming is exact: the checkpoint holds the loader's position and every rank's RNG states,
  and loader iterators are created inside `fork_rng`, so dropout draws the same numbers whether
  or not a run was interrupted. Processes and collectives live in
  `grr_train/runtime/distributed.py`, what is done to the model (DDP or FSDP2, compile) in
  `grr_train/runtime/parallel.py`, checkpoint folders in `grr_train/runs/`.
- Stopping: SIGTERM or SIGINT (Ctrl-C) only sets `_signal`. `_stop_signalled` is the one place
  that turns it into `stop_reason` (the one stop state), with every rank agreeing: after each
  step (its flag rides on the step's read-back), between validation batches and after a save.
  The run then saves and exits 0. A validation the stop cut short (or came before) is redone on
  resume, before the next step, so the resumed run logs every record an unbroken run does: at the
  epoch's end the checkpoint's step_in_epoch says the epoch end (validation, early stopping) is
  still to do; at a `val_every` step `Progress.validation_pending` says so, and the checkpoint is
  saved again once the step is validated. Redone rather than finished first: validating a large
  split takes minutes, longer than a scheduler waits after its SIGTERM. A second signal of the
  same kind is not caught: a second Ctrl-C interrupts at once, a second SIGTERM kills.
- A data store that stops answering (a set in s3:// or gs://, after grr_data/infra/store.py's
  retries) stops the run with its StoreError after saving the last whole step, the loader back at
  it, so `--resume` continues exactly. Batches are read through a `StoreGuard` (store_guard.py):
  under several processes every rank learns of a failure on any rank before the step's (or the
  validation batch's) collectives and all save together; a validation cut short is redone on resume.
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

from grr_data.format.manifest import Manifest
from grr_data.infra.lock import hold_lock
from grr_data.infra.progress import progress, say
from grr_data.infra.store import StoreError
from grr_train.model.summary import flops_per_sample
from grr_train.runs import checkpoint as ckpt
from grr_train.runs.metrics import MetricsLog, truncate_metrics
from grr_train.runs.tokenizer import copy_tokenizer
from grr_train.runtime.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    init_distributed,
)
from grr_train.runtime.parallel import parallelize, peak_flops, resolve_switch, unwrap
from grr_train.runtime.precision import autocast_dtype
from grr_train.train import setup as checks
from grr_train.train.config import TrainConfig
from grr_train.train.early_stop import IMPROVED, RESET, STOP, SoftResetEarlyStopper
from grr_train.train.examples import ExampleCaptions
from grr_train.train.plan import BatchPlan
from grr_train.train.report import RunFacts, RunOutcome, end_summary, start_banner
from grr_train.train.schedule import lr_at, set_lr
from grr_train.train.state import Progress, RunState
from grr_train.train.step import StepSettings, TrainStep
from grr_train.train.store_guard import StoreGuard
from grr_train.train.validate import validate


class NonFiniteLoss(RuntimeError):
    pass


def run_training(cfg: TrainConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Entry point for every process: join the group, train, leave. Returns the run summary.

    The main process holds the run folder's lock throughout (grr_data/infra/lock.py), so a second
    trainer on the same folder fails at once naming the first; a restart after the holder died
    takes the lock over.
    """
    info = init_distributed(cfg.process_group_timeout_minutes)
    created = not Path(run_dir).exists()
    started = False
    try:
        lock = hold_lock(run_dir, what=f"grr train {cfg.recipe}", break_lock=cfg.break_lock) \
            if info.is_main else nullcontext()
        with lock:
            trainer = Trainer(cfg, Path(run_dir), info, resume=resume)
            started = True
            return trainer.train()
    finally:
        destroy_distributed()
        if created and not started and info.is_main:  # refused while setting up: leave no empty run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, resume: bool = False):
        self.run_dir, self.info = run_dir, info
        latest = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
        if resume and latest is None:
            raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from")
        if not resume and latest is not None:
            raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume, or choose another --out")
        self.data = Manifest.read(cfg.data)  # read once, passed down
        self.special = self.data.special
        cfg, self._batch_note = checks.fit_batches_to_data(cfg, self.data, info.world_size)
        self.device = info.device
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        self.plan = BatchPlan.for_run(cfg, info.world_size)
        self._seed_everything(cfg.seed + info.rank)  # ranks differ so their dropout masks differ

        self.train_loader, self.val_loader = checks.make_loaders(cfg, self.data, self.plan, info.rank, self.device,
                                                                 self.autocast_dtype)
        self.steps_per_epoch = len(self.train_loader) // self.plan.accumulation  # whole: the plan pads
        self.store_guard = StoreGuard.for_run(self.data.root, info, cfg.process_group_timeout_minutes)
        cfg, self._epochs_note = checks.fit_epochs_to_max_steps(cfg, self.steps_per_epoch)
        self.cfg = cfg

        # fine-tuning: `cfg` comes back naming the --from model's preset, which the run records
        model, self.model_config, cfg = checks.build_run_model(cfg, run_dir, self.data, resume)
        self.cfg = cfg
        sharded = cfg.parallelism == "fsdp"
        self.compile_mode = checks.compile_mode(cfg, info.device)
        self.model = parallelize(model, info, compile=self.compile_mode, parallelism=cfg.parallelism,
                                 activation_checkpointing=cfg.activation_checkpointing, param_dtype=self.autocast_dtype,
                                 aligned_widths=resolve_switch("aligned_widths", cfg.aligned_widths, self.device),
                                 inductor_random=cfg.inductor_random)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr_max, betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay, fused=True,
        )
        self.train_step_fn = TrainStep(self.model, self.optimizer, self.special, StepSettings.for_run(
            cfg, self.model_config.temperature, info.world_size, self.autocast_dtype, self.device, self.compile_mode),
            self.device)
        self.stopper = SoftResetEarlyStopper(cfg.patience_per_level, cfg.num_lr_levels, cfg.lr_reduction)
        self.state = Progress()
        self.checkpoints = RunState(run_dir, info, self.model, self.optimizer, self.state, self.stopper,
                                    self.train_loader, self.plan, self.steps_per_epoch, sharded, {})
        self.stop_reason: str | None = None
        self._signal: int | None = None
        self._previous_handlers: dict = {}
        self._loader_state: dict | None = None
        self._events: list[dict] = []  # for metrics.jsonl once it is open
        self.peak = peak_flops(self.device)
        self.flops_per_sample = flops_per_sample(self.model_config)

        # The run carries its tokenizer (run_dir/tokenizer/), so it evaluates and captions elsewhere.
        tokenizer_record = self.data.tokenizer.to_dict()
        if resume:
            resumed = self.checkpoints.restore(latest, self.data, cfg.allow_other_tokenizer, cfg.seed)
            self._loader_state, self._events = resumed.loader_state, resumed.events
            if resumed.reseed is not None:
                self._seed_everything(resumed.reseed)
            if info.is_main:
                dropped = truncate_metrics(run_dir, self.state.step)
                say(f"resumed {run_dir} at step {self.state.step} (epoch {self.state.epoch}); "
                           f"dropped {dropped} metric records logged after that checkpoint")
            tokenizer_record = json.loads((run_dir / "config.json").read_text()).get("tokenizer", tokenizer_record)
        elif info.is_main:
            # A fresh start in a folder without checkpoints (a run that died before its first
            # save): its metrics are of steps that no longer exist.
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            tokenizer_record = copy_tokenizer(run_dir, tokenizer_record)
            ckpt.write_run_config(run_dir, self.model_config.to_dict(), cfg.to_dict(), self.special, tokenizer_record)
        self.checkpoints.describe_run = {"model_config": self.model_config.to_dict(), "train_config": cfg.to_dict(),
                                         "special": self.special.to_dict(), "tokenizer": tokenizer_record}
        barrier()
        # On resume, TensorBoard drops the events past the checkpoint, as truncate_metrics does.
        wandb = None if not cfg.wandb_project else {
            "project": cfg.wandb_project, "entity": cfg.wandb_entity, "mode": cfg.wandb_mode,
            "config": {"train": cfg.to_dict(), "model": self.model_config.to_dict()}}
        self.log = MetricsLog(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard,
                              purge_step=self.state.step + 1 if resume else None, wandb=wandb)
        if not resume:
            self.log.log_settings({"train": cfg.to_dict(), "model": self.model_config.to_dict()})
        # Example captions at each validation, where TensorBoard or W&B shows them (examples.py says when).
        self.examples = ExampleCaptions(run_dir, self.data, cfg.val_split, self.device, self.autocast_dtype) \
            if self.log.has_viewers and self.val_loader is not None and not sharded else None
        self._resumed = resume
        self._announce()

    # ---- the loop ------------------------------------------------------------------------

    def train(self) -> dict:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self._previous_handlers = previous
        total = self.cfg.epochs * self.steps_per_epoch
        if self.cfg.max_steps is not None:
            total = min(total, self.cfg.max_steps)
        # A bar on a terminal; elsewhere (Slurm, nohup) a plain line for the first steps, then
        # every log_every steps or log_every_s seconds (grr_data/infra/progress.py).
        started, first_step = time.perf_counter(), self.state.step
        self._step_seconds = 0.0
        self.progress = progress(total=total, initial=min(self.state.step, total), disable=not self.info.is_main,
                                 desc=f"{self.cfg.recipe} x{self.info.world_size}", unit="step", first=3,
                                 every_n=self.cfg.log_every or None, every_s=self.cfg.log_every_s,
                                 dynamic_ncols=True)
        try:
            try:
                while self.stop_reason is None and self.state.epoch < self.cfg.epochs:
                    self.run_epoch()
            except StoreError as err:
                raise self._save_after_store_failure(err) from err
            reached_max = self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps
            self.stop_reason = self.stop_reason or ("max_steps" if reached_max else "epochs")
            if self.checkpoints.last_saved_step != self.state.step:
                self.save()
            self.log.log({"kind": "event", "step": self.state.step, "what": "stop", "reason": self.stop_reason,
                          "epoch": self.state.epoch, "num_skipped": self.state.num_skipped,
                          "samples_skipped": self._samples_skipped(), "time": time.time()})
        finally:
            self.progress.close()
            self.log.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.info.is_main:
            self._say_summary(time.perf_counter() - started, self.state.step - first_step)
        self._check_skipped_fraction()
        return {"step": self.state.step, "epoch": self.state.epoch, "stop_reason": self.stop_reason,
                "num_skipped": self.state.num_skipped, "samples_skipped": self._samples_skipped(),
                "signal": self._signal, "run_dir": str(self.run_dir),
                "best_loss": self.stopper.best if self.cfg.early_stop else None}

    def run_epoch(self) -> None:
        """Train the rest of this epoch, then validate and save; returns early once stop_reason is set."""
        batches = self._epoch_batches()  # first: a save below records the restored loader position
        if self.state.validation_pending and self.val_loader is not None:  # none: resumed on data without it
            self._finish_interrupted_validation()
            if self.stop_reason:
                return
        last_time = time.perf_counter()
        while self.state.step_in_epoch < self.steps_per_epoch:
            if self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps:
                self.stop_reason = "max_steps"
                return
            metrics = self.train_step(self.store_guard.read(  # a store failure on any rank: all stop here
                lambda: [self._next_batch(batches) for _ in range(self.plan.accumulation)]))
            self.state.step += 1
            self.state.step_in_epoch += 1
            self.state.validation_pending = bool(  # until it is done: a stop before then saves it as pending
                self.val_loader is not None and self.cfg.val_every and self.state.step % self.cfg.val_every == 0
                and self.state.step_in_epoch < self.steps_per_epoch)
            self._log_train(metrics, time.perf_counter() - last_time)
            if not self._stop_signalled(metrics["stop_requested"]) and self.state.step_in_epoch < self.steps_per_epoch:
                self._between_steps()
            if self.stop_reason:
                return
            last_time = time.perf_counter()  # after validation and saves: the next step times itself only
        self.end_epoch()

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns the step's global metrics."""
        lr = lr_at(self.state.step, lr_max=self.cfg.lr_max, lr_min=self.cfg.lr_min, warmup_steps=self.cfg.warmup_steps,
                   cycle_steps=self.cfg.lr_cycle_steps or self.steps_per_epoch, scale=self.stopper.lr_scale)
        set_lr(self.optimizer, lr)
        m = self.train_step_fn(micro_batches, stop_flag=self._signal is not None)
        if not m["finite"]:
            if not self.cfg.skip_nonfinite:
                saved = self.checkpoints.last_saved_step
                good = (f"the last good checkpoint is {ckpt.checkpoint_folder(self.run_dir, saved)}" if saved >= 0
                        else "no checkpoint was saved before it")
                raise NonFiniteLoss(
                    f"step {self.state.step + 1}: loss {m['loss']} / gradient norm {m['grad_norm']} is not finite; "
                    f"{good} (set skip_nonfinite=true to skip such steps instead)"
                )
            self.state.num_skipped += 1
            self.log.log({"kind": "event", "step": self.state.step + 1, "what": "skip_nonfinite", "loss": m["loss"],
                          "grad_norm": m["grad_norm"], "num_skipped": self.state.num_skipped, "time": time.time()})
        return {**m, "lr": lr}

    def _between_steps(self) -> None:
        """Validation and saves that fall inside an epoch (the epoch's end has its own)."""
        validating = self.state.validation_pending
        saving = self.state.step % self.cfg.checkpoint_every == 0
        if validating:
            self.state.validation_pending = self.run_validation() is None
        if saving and not self.stop_reason:
            self.save()
        if (validating or saving) and not self.stop_reason:
            self._stop_signalled()  # a signal that came while validating or saving

    def _finish_interrupted_validation(self) -> None:
        """The run resumed from a checkpoint saved by a stop before this step's validation finished:
        validate now, and save again so that no later resume from it validates the step twice."""
        if self.run_validation() is None:
            return  # stopped again: the checkpoint still says pending
        self.state.validation_pending = False
        self.save()
        self._stop_signalled()

    def end_epoch(self) -> None:
        result = self.run_validation() if self.val_loader is not None else None
        if self.stop_reason:
            return  # interrupted: train() saves at the epoch's end, validation still to do
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        if self.cfg.early_stop:
            self._early_stop(result)
        self.save()
        self._stop_signalled()

    def _early_stop(self, result: dict) -> None:
        if not math.isfinite(result["loss"]):
            raise NonFiniteLoss(
                f"epoch {self.state.epoch}: the {self.cfg.val_split!r} loss is {result['loss']} (contrastive "
                f"{result['contrastive']} over chunks of {result['contrastive_batch_size']} of its "
                f"{result['num_samples']} samples, caption {result['caption']}), which early stopping cannot "
                f"rank; if the split is smaller than a chunk, lower --set val_contrastive_batch_size=, else "
                f"the model diverged: the last good checkpoint is in {self.run_dir / 'checkpoints'}"
            )
        action = self.stopper.update(result["loss"], self.state.step)
        self.log.log({"kind": "event", "step": self.state.step, "what": f"early_stop_{action}",
                      "epoch": self.state.epoch, "best": self.stopper.best, "level": self.stopper.level,
                      "num_bad_epochs": self.stopper.num_bad_epochs, "time": time.time()})
        if action == IMPROVED:
            self.checkpoints.save_best()
        elif action == RESET:
            self.checkpoints.load_best()
        elif action == STOP:
            self.stop_reason = "early_stop"
        if self.info.is_main and action != "wait":
            say(f"step {self.state.step}: early stopping {action.replace('_', ' ')} (best "
                       f"{self.stopper.best:.4f}, learning-rate level {self.stopper.level + 1} of "
                       f"{self.cfg.num_lr_levels})")

    def run_validation(self) -> dict | None:
        """Validate on the val split and log it; sets stop_reason (and returns None) when a stop
        signal came before it finished."""
        self.val_loader.set_epoch(0)
        bar = progress(total=len(self.val_loader), desc="validate", unit="batch", leave=False,
                       disable=not self.info.is_main)
        try:
            with torch.random.fork_rng(devices=[]):
                result = validate(unwrap(self.model), self.store_guard.batches(self.val_loader), self.special,
                                  self.cfg.lambda_con, self.cfg.lambda_cap, self.model_config.temperature,
                                  self.cfg.val_contrastive_batch_size, self.autocast_dtype, progress=bar,
                                  should_stop=self._stop_signalled, trim_padding=self.cfg.trim_text_padding,
                                  trim_bucket=self.train_step_fn.settings.trim_bucket)
        finally:
            bar.close()
        if result is None:
            return None
        self.log.log({"kind": "val", "step": self.state.step, "epoch": self.state.epoch, "split": self.cfg.val_split,
                      **result, "time": time.time()})
        if self.info.is_main:
            say(f"step {self.state.step} {self.cfg.val_split}: loss {result['loss']:.4f} "
                       f"contrastive {result['contrastive']:.4f} (batch {result['contrastive_batch_size']}) "
                       f"perplexity {result['perplexity']:.2f}")
            self._log_examples()
        return result

    def _log_examples(self) -> None:
        if self.examples is None:
            return
        rows = self.examples.rows(unwrap(self.model))
        if rows:
            self.log.log_captions(self.state.step, f"{self.cfg.val_split}/examples", rows)
        elif self.examples.unavailable:
            say(f"note: no example captions for TensorBoard/W&B: {self.examples.unavailable}")
            self.examples = None

    def save(self) -> None:
        if self.info.is_main:
            self.log.sync()  # metrics up to a checkpoint are on disk when it is
        self.checkpoints.save(self.cfg.keep_checkpoints)

    def _save_after_store_failure(self, err: StoreError) -> StoreError:
        """Save the last whole step after a store failure (on every rank: the StoreGuard raised it on all)."""
        # the micro-batches read for the step that failed are read again on resume
        self.train_loader.load_state_dict({**self.train_loader.state_dict(), "epoch": self.state.epoch,
                                           "batches_done": self.state.step_in_epoch * self.plan.accumulation})
        self.log.log({"kind": "event", "step": self.state.step, "what": "store_failure", "error": str(err),
                      "time": time.time()})  # before the save, which syncs the log: on disk if a rank exits first
        if self.checkpoints.last_saved_step != self.state.step:
            self.save()
        return StoreError(f"{err}; step {self.state.step} is saved: rerun with --resume once the store answers")

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
        steps = max(self.state.step, 1)
        if self.state.num_skipped and self.state.num_skipped / steps > self.cfg.max_skipped_fraction:
            raise NonFiniteLoss(
                f"{self.state.num_skipped} of {self.state.step} steps had a non-finite loss or gradient and were "
                f"skipped, more than max_skipped_fraction {self.cfg.max_skipped_fraction}: the run saved its state "
                f"in {self.run_dir} but is not healthy (lower lr_max, check the data)"
            )

    # ---- helpers -------------------------------------------------------------------------

    def _epoch_batches(self):
        if self.state.step_in_epoch > 0 and self._loader_state is not None:
            self.train_loader.load_state_dict(self._loader_state)  # resume mid-epoch
        else:
            self.train_loader.set_epoch(self.state.epoch)
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
                               f"{len(self.train_loader)} batches (epoch {self.state.epoch})") from None

    def _log_train(self, m: dict, seconds: float) -> None:
        self._step_seconds += seconds
        samples_per_s = self.plan.global_batch / max(seconds, 1e-9)
        record = {"kind": "train", "step": self.state.step, "epoch": self.state.epoch, "loss": m["loss"],
                  "contrastive": m["contrastive"], "caption": m["caption"], "lr": m["lr"],
                  "grad_norm": m["grad_norm"], "samples_per_s": samples_per_s}
        if self.peak is not None:
            record["mfu"] = samples_per_s * self.flops_per_sample / (self.peak * self.info.world_size)
        if self.train_loader.skipped:  # unusable samples this rank's loader replaced, by reason, so far
            record["samples_skipped"] = dict(self.train_loader.skipped)
        record["time"] = time.time()
        self.log.log(record)
        self.progress.set_postfix({"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}",
                                   "samples/s": f"{samples_per_s:.1f}"}, refresh=False)
        self.progress.update(1)

    def _announce(self) -> None:
        """What a user should know before the first step, on the console and in metrics.jsonl."""
        cfg = self.cfg
        for event in self._events:
            self.log.log({**event, "time": time.time()})
        if not self.info.is_main:
            return
        for note in (self._batch_note, self._epochs_note):
            if note:
                say(note)
        total = self.cfg.epochs * self.steps_per_epoch
        total = total if cfg.max_steps is None else min(total, cfg.max_steps)
        for line in start_banner(RunFacts(cfg, self.run_dir, self.model_config, self.data, self.plan,
                                          self.steps_per_epoch, total, self.state.step, self._resumed, self.device,
                                          self.autocast_dtype, self.compile_mode, self.train_loader)):
            say(line)
        for line in checks.setting_warnings(cfg, self.plan, self.device, total):
            say(line)
        if self.val_loader is None:
            extra = f" (val_every {cfg.val_every} is ignored)" if cfg.val_every else ""
            say(f"warning: {self.data.path} has no {cfg.val_split!r} split; training without "
                       f"validation{extra}")
        if self.data.split_mode == "paper":
            overlaps = dict(self.data.overlapping_splits)
            say(f"WARNING: {cfg.data} uses the paper split (split_mode 'paper', overlapping "
                       f"{overlaps}): its {cfg.val_split!r} pairs are also training pairs, so validation "
                       "and early stopping on it measure fitting, not generalisation")
            self.log.log({"kind": "event", "step": self.state.step, "what": "paper_split", "data": cfg.data,
                          "overlapping_splits": overlaps, "time": time.time()})
        if cfg.max_steps is not None and self.state.step >= cfg.max_steps:
            say(f"max_steps {cfg.max_steps} already reached (the run is at step {self.state.step}); "
                       "pass --max-steps M or --set max_steps=none to train further")

    def _say_summary(self, seconds: float, steps: int) -> None:
        outcome = RunOutcome(self.stop_reason, self.state.step, self.state.epoch, steps, seconds, self._step_seconds,
                             self.plan.global_batch, self._signal, self.state.num_skipped)
        for line in end_summary(self.run_dir, outcome, self.cfg.val_split):
            say(line)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
