"""The trainer end to end on a tiny preset and a small sharded set (CPU, fp32).

Fits the data, resumes exactly (per-step losses equal an uninterrupted run's, dropout on,
gradient accumulation, an epoch boundary with validation in between), saves on SIGTERM, and
fine-tunes with the soft-reset early stopper; refuses a NaN early-stopping loss, stops
validation between batches on a signal, times steps without validation and saves, says when
max_steps is already reached, and purges TensorBoard past the checkpoint on resume.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grr_train.runs.metrics import read_metrics
from grr_train.train.config import TrainConfig
from grr_train.train.settings import resume_config
from grr_train.train.trainer import run_training

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path, train_sizes, val_sizes=None) -> Path:
    """A set with a train split and, if asked, a val split (shardset writes one split at a time)."""
    val = None
    if val_sizes:
        make_shardset(root, shard_sizes=val_sizes, split="val", seed=1)
        val = json.loads((root / "manifest.json").read_text())["splits"]["val"]
    make_shardset(root, shard_sizes=train_sizes, split="train", seed=0)
    if val:
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["splits"]["val"] = val
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), (6, 6), (4,))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("small"), (4,), (4,))


def tiny(data: Path, **kw) -> TrainConfig:
    base = dict(preset="grr-tiny", data=str(data), per_device_batch_size=2, global_batch_size=4,
                warmup_steps=2, lr_max=1e-3, lr_min=1e-4, num_workers=0, loader="cpu", val_batch_size=4,
                val_contrastive_batch_size=2, checkpoint_every=2, keep_checkpoints=2, epochs=2, tensorboard=False)
    return replace(TrainConfig(), **{**base, **kw})


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run, "train")]


def test_small_preset_fits_the_data(tmp_path, small_data):  # quick tier: 12 steps of 4 samples
    # 4 samples, one step per epoch, constant lr: the CoCa loss (about 14 at the start) must fall clearly.
    cfg = tiny(small_data, per_device_batch_size=4, epochs=12, warmup_steps=0, lr_min=1e-3, dropout=0.0,
               val_split="none")
    summary = run_training(cfg, tmp_path / "run")
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    assert summary["step"] == 12 and summary["stop_reason"] == "epochs"
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.slow
def test_resume_gives_the_same_losses(tmp_path, data):
    # 12 samples, 2 per micro-batch, 2 micro-batches per step: 3 steps per epoch, 6 in all.
    cfg = tiny(data, dropout=0.15)
    full = run_training(cfg, tmp_path / "full")
    assert full["step"] == 6
    run_training(replace(cfg, max_steps=4), tmp_path / "part")  # stops inside the second epoch
    resumed = run_training(resume_config(tmp_path / "part", max_steps=6), tmp_path / "part", resume=True)
    assert resumed["step"] == 6
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")  # exact, not approximate
    vals = [r for r in read_metrics(tmp_path / "part", "val")]
    assert [v["step"] for v in vals] == [3, 6] and vals == [
        {**v, "time": w["time"]} for v, w in zip(read_metrics(tmp_path / "full", "val"), vals, strict=True)]
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000004", "step-0000006"]  # keep_checkpoints=2


def test_fresh_run_refuses_a_used_folder(tmp_path, data):
    cfg = tiny(data, max_steps=1)
    run_training(cfg, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(cfg, tmp_path / "run")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, data):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "grr_cli.main", "train", "pretrain", "--preset", "grr-tiny", "--data", str(data),
           "--out", str(run), "--set", "per_device_batch_size=2", "--set", "global_batch_size=2",
           "--set", "num_workers=0", "--set", "loader=cpu", "--set", "epochs=50", "--set", "checkpoint_every=1000",
           "--set", "tensorboard=false", "--set", "val_contrastive_batch_size=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run, "train")) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stop_reason"] == "signal"
    step = summary["step"]
    assert (run / "checkpoints" / f"step-{step:07d}" / "model.safetensors").exists()
    resumed = run_training(resume_config(run, max_steps=step + 1), run, resume=True)
    assert resumed["step"] == step + 1
    assert [s for s, _ in train_losses(run)] == list(range(1, step + 2))


def scripted_validation(monkeypatch, losses) -> None:
    """Validation that returns the given losses in turn (the trainer's own validation is tested
    in tests/test_train_validate.py), so early stopping's decisions are known in advance."""
    import grr_train.train.trainer as trainer

    script = iter(losses)

    def validate(*args, **kwargs):
        loss = next(script)
        return {"loss": loss, "contrastive": loss / 3, "caption": loss / 3, "perplexity": math.exp(loss / 3),
                "contrastive_batch_size": 4, "num_samples": 4, "num_tokens": 9, "num_contrastive_dropped": 0}

    monkeypatch.setattr(trainer, "validate", validate)


def recorded_steps(monkeypatch) -> list[dict]:
    """Each train step's weights and optimizer state before and after it, in order."""
    import copy

    import grr_train.train.trainer as trainer
    from grr_train.runtime.parallel import unwrap

    records, real = [], trainer.Trainer.train_step

    def snapshot(self) -> dict:
        return {"weights": {n: t.clone() for n, t in unwrap(self.model).state_dict().items()},
                "moments": copy.deepcopy(self.optimizer.state_dict()["state"])}

    def recording(self, micro_batches):
        before = snapshot(self)
        metrics = real(self, micro_batches)
        records.append({"before": before, "after": snapshot(self), "lr": metrics["lr"]})
        return metrics

    monkeypatch.setattr(trainer.Trainer, "train_step", recording)
    return records


def same_moments(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in ("exp_avg", "exp_avg_sq"))


def soft_reset_run(tmp_path, data, monkeypatch, **kw) -> tuple[dict, list[dict]]:
    """Fine-tune 1 step per epoch at lr 1e-3 (no warm-up) with validation losses 5, 6, 7 (better,
    worse, worse): patience 1 and 2 levels give improved (best/ = step 1), reset (reload best/,
    lr divided by lr_reduction 10) and stop. Returns the summary and the per-step records."""
    pre = tmp_path / "pre"
    run_training(tiny(data, max_steps=1, val_split="none", **kw), pre)
    scripted_validation(monkeypatch, [5.0, 6.0, 7.0])
    records = recorded_steps(monkeypatch)
    cfg = tiny(data, recipe="finetune", init_from=str(pre), dataset="test", lr_max=1e-3, lr_min=1e-4,
               per_device_batch_size=4, warmup_steps=0, early_stop=True, patience_per_level=1, num_lr_levels=2,
               lr_reduction=10.0, epochs=10, dropout=0.1, **kw)
    return run_training(cfg, tmp_path / "fine"), records


def check_soft_reset(run: Path, summary: dict, records: list[dict]) -> None:
    from grr_train.runs.weights import load_model

    events = [r["what"] for r in read_metrics(run, "event")]
    assert events == ["early_stop_improved", "early_stop_reset", "early_stop_stop", "stop"]
    assert summary["stop_reason"] == "early_stop" and summary["epoch"] == 3 and summary["step"] == 3
    after_1, before_3 = records[0]["after"], records[2]["before"]
    after_2 = records[1]["after"]
    best, _ = load_model(run / "best")
    for name, tensor in best.state_dict().items():
        assert torch.equal(after_1["weights"][name], tensor), name  # best/ holds step 1's weights
        assert torch.equal(before_3["weights"][name], tensor), name  # the reset reloaded them
    # step 2 moved the weights and moments (lr 1e-3), so the reset undid something
    assert any(not torch.equal(after_2["weights"][n], t) for n, t in best.state_dict().items())
    assert not same_moments(after_2["moments"], after_1["moments"])
    assert same_moments(before_3["moments"], after_1["moments"])  # the moments of best/, restored
    # the learning rate of each epoch's one step: lr_max, lr_max, then lr_max / lr_reduction
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3, 1e-4], rel=1e-12)
    assert [r["lr"] for r in read_metrics(run, "train")] == pytest.approx([1e-3, 1e-3, 1e-4], rel=1e-12)


def test_finetune_soft_reset_reloads_best_and_lowers_the_lr_then_stops(tmp_path, small_data, monkeypatch):
    summary, records = soft_reset_run(tmp_path, small_data, monkeypatch)
    check_soft_reset(tmp_path / "fine", summary, records)
    saved = json.loads((tmp_path / "fine" / "config.json").read_text())
    assert saved["model"]["dropout"] == 0.1 and saved["train"]["init_from"] == str(tmp_path / "pre")
    from grr_train.runs.checkpoint import load_state

    best_moments = load_state(tmp_path / "fine" / "best")["optimizer"]["state"]
    assert same_moments(best_moments, records[0]["after"]["moments"])


def test_paper_split_warns_and_run_records_the_tokenizer(tmp_path, capsys):
    from grr_train.runs.weights import load_model

    data = make_data(tmp_path / "data", (4,), (4,))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.update(split_mode="paper", overlapping_splits={"train/val": 4})
    (data / "manifest.json").write_text(json.dumps(manifest))
    run_training(tiny(data, per_device_batch_size=4, max_steps=1, epochs=1), tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("WARNING") and "paper split" in line for line in lines), lines
    (event,) = [r for r in read_metrics(tmp_path / "run", "event") if r["what"] == "paper_split"]
    assert event["step"] == 0 and event["overlapping_splits"] == {"train/val": 4}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tokenizer"] == manifest["tokenizer"]
    _, info = load_model(tmp_path / "run")
    assert info["tokenizer"] == manifest["tokenizer"]


def test_batches_larger_than_the_splits_are_capped_with_one_warning(tmp_path, small_data, capsys):
    # 4 train and 4 val pairs against the paper's batches: no NaN validation, one warning, and
    # the run records what it trained with.
    cfg = tiny(small_data, early_stop=True, per_device_batch_size=None, contrastive_batch_size=192,
               global_batch_size=768, val_contrastive_batch_size=192, epochs=1)
    summary = run_training(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "fewer than the batches asked for" in line]
    assert len(warnings) == 1 and "contrastive_batch_size 4" in warnings[0] and "the paper's" in warnings[0]
    val = read_metrics(tmp_path / "run", "val")
    assert val and all(math.isfinite(r["loss"]) for r in val) and val[0]["contrastive_batch_size"] == 4
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (train["contrastive_batch_size"], train["global_batch_size"]) == (4, 4)
    assert summary["step"] == 1


@pytest.mark.slow
def test_max_steps_beyond_the_epochs_raises_the_epochs_and_says_so(tmp_path, small_data, capsys):
    summary = run_training(tiny(small_data, per_device_batch_size=4, max_steps=3, epochs=1, val_split="none"),
                           tmp_path / "run")
    assert summary["step"] == 3 and summary["stop_reason"] == "max_steps"
    assert "epochs raised from 1 to 3" in capsys.readouterr().out


def test_early_stop_refuses_a_nan_validation_loss(tmp_path, small_data, monkeypatch):
    import grr_train.train.trainer as trainer

    def nan_validate(*args, **kwargs):
        return {"loss": float("nan"), "contrastive": float("nan"), "caption": 1.0, "perplexity": 2.7,
                "contrastive_batch_size": 2, "num_samples": 4, "num_tokens": 9, "num_contrastive_dropped": 0}

    monkeypatch.setattr(trainer, "validate", nan_validate)
    with pytest.raises(trainer.NonFiniteLoss, match="cannot rank"):
        run_training(tiny(small_data, per_device_batch_size=4, early_stop=True), tmp_path / "run")


def test_a_signal_stops_validation_between_batches(tmp_path, small_data, monkeypatch):
    # Validation in 2 batches of 2; SIGTERM arrives while the first is validated: the run must
    # save and stop before the second, not finish validating and train another step.
    import grr_train.train.trainer as trainer

    real_validate, seen, handler_after = trainer.validate, [], []
    before = signal.getsignal(signal.SIGTERM)

    def signalling(loader):
        for batch in loader:
            seen.append(batch)
            yield batch
            os.kill(os.getpid(), signal.SIGTERM)
            handler_after.append(signal.getsignal(signal.SIGTERM))

    forwards = []

    def validating(model, loader, *a, **k):
        hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
        try:
            return real_validate(model, signalling(loader), *a, **k)
        finally:
            hook.remove()

    monkeypatch.setattr(trainer, "validate", validating)
    run = tmp_path / "run"
    summary = run_training(tiny(small_data, per_device_batch_size=4, val_batch_size=2, epochs=3), run)
    assert summary["stop_reason"] == "signal" and summary["step"] == 1 and summary["epoch"] == 0
    # the second batch arrives with the signal and is not validated
    assert len(seen) == 2 and len(forwards) == 1 and read_metrics(run, "val") == []
    assert handler_after == [before]  # a second SIGTERM is not caught again
    assert signal.getsignal(signal.SIGTERM) == before
    # The epoch's validation is redone on resume, then training goes on.
    monkeypatch.setattr(trainer, "validate", real_validate)
    resumed = run_training(resume_config(run, max_steps=2), run, resume=True)
    assert resumed["step"] == 2 and [r["step"] for r in read_metrics(run, "val")] == [1, 2]


@pytest.mark.slow
def test_step_time_excludes_validation_and_saves(tmp_path, data, monkeypatch):
    # Validation and saves move the trainer's clock on by an hour instead of taking time, so the
    # check does not depend on how busy the machine is.
    import types

    import grr_train.train.trainer as trainer

    hour, offset = 3600.0, [0.0]
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + offset[0], time=time.time))
    for name in ("run_validation", "save"):
        def slow(self, _original=getattr(trainer.Trainer, name)):
            offset[0] += hour
            return _original(self)

        monkeypatch.setattr(trainer.Trainer, name, slow)
    cfg = tiny(data, epochs=2, val_every=1, checkpoint_every=1)  # 3 steps per epoch; both after every step
    run_training(cfg, tmp_path / "run")
    seconds = [cfg.global_batch_size / r["samples_per_s"] for r in read_metrics(tmp_path / "run", "train")]
    assert len(seconds) == 6 and max(seconds) < hour, seconds


def test_resume_at_max_steps_says_so(tmp_path, small_data, capsys):
    cfg = tiny(small_data, per_device_batch_size=4, max_steps=1, val_split="none")
    run_training(cfg, tmp_path / "run")
    capsys.readouterr()
    summary = run_training(resume_config(tmp_path / "run"), tmp_path / "run", resume=True)
    assert summary["step"] == 1 and summary["stop_reason"] == "max_steps"
    assert "max_steps 1 already reached" in capsys.readouterr().out


def test_resume_purges_tensorboard_events_past_the_checkpoint(tmp_path, small_data, monkeypatch):
    # tensorboard is optional (not installed here): a stand-in SummaryWriter records its arguments.
    import types

    writers, tags = [], set()

    class Writer:
        def __init__(self, log_dir, **kwargs):
            writers.append(kwargs)

        def add_scalar(self, tag, *args):
            tags.add(tag)

        def add_text(self, tag, *args):  # the run's settings; example captions (none: no tokenizer copy here)
            tags.add(tag)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    cfg = tiny(small_data, per_device_batch_size=4, max_steps=2, tensorboard=True, val_every=1)
    run_training(cfg, tmp_path / "run")
    run_training(resume_config(tmp_path / "run", max_steps=3), tmp_path / "run", resume=True)
    assert writers == [{}, {"purge_step": 3}]
    assert {"train/loss", "train/grad_norm", "val/perplexity", "val/loss"} <= tags  # not "val/val/perplexity"
    assert not any(t.startswith(("val/val/", "event/")) for t in tags)


@pytest.mark.slow
def test_the_epoch_tail_is_padded_to_a_whole_step(tmp_path, data):
    # 12 training samples, micro-batch 2, accumulation 4: 6 batches padded to 8, so 2 steps per
    # epoch, none of the 12 dropped (the old `len // accumulation` gave 1 step and dropped 4).
    run = tmp_path / "run"
    summary = run_training(tiny(data, global_batch_size=8, epochs=2, val_split="none"), run)
    assert summary["step"] == 4
    assert [(r["step"], r["epoch"]) for r in read_metrics(run, "train")] == [(1, 0), (2, 0), (3, 1), (4, 1)]


@pytest.mark.slow
def test_samples_the_loader_skips_reach_the_metrics(tmp_path, data):
    import shutil

    from grr_data.format.records import read_index

    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    shard = bad / "train" / "shard-000000.tar"
    table = read_index(shard.with_suffix(".idx"))
    col = table.column("jpg")
    offset = int(table.offsets[0, col]) + int(table.sizes[0, col]) // 2  # inside the first sample's JPEG
    blob = bytearray(shard.read_bytes())
    blob[offset] ^= 0xFF
    shard.write_bytes(bytes(blob))
    run = tmp_path / "run"
    summary = run_training(tiny(bad, max_steps=3, val_split="none"), run)
    assert summary["samples_skipped"] == {"checksum_mismatch": 1}
    assert any(r.get("samples_skipped") == {"checksum_mismatch": 1} for r in read_metrics(run, "train"))


def test_a_fresh_start_in_a_folder_without_checkpoints_drops_the_dead_runs_metrics(tmp_path, small_data):
    run = tmp_path / "run"
    run_training(tiny(small_data, per_device_batch_size=4, max_steps=1, val_split="none", checkpoint_every=100),
                 run)
    shutil.rmtree(run / "checkpoints")  # as if it died before its first save
    run_training(tiny(small_data, per_device_batch_size=4, max_steps=1, val_split="none"), run)
    assert [r["step"] for r in read_metrics(run, "train")] == [1]


def test_a_second_trainer_on_the_same_run_folder_fails_at_once_naming_the_first(tmp_path, small_data):
    import socket

    from grr_data.infra.lock import LockedError, hold_lock

    run = tmp_path / "run"
    with hold_lock(run, what="the first trainer"):  # this process plays the first trainer
        with pytest.raises(LockedError, match=rf"PID {os.getpid()}.*{socket.gethostname()}|{socket.gethostname()}.*{os.getpid()}"):
            run_training(tiny(small_data, per_device_batch_size=4, max_steps=1, val_split="none"), run)
    assert not (run / "checkpoints").exists()


def test_val_every_without_a_val_split_trains_without_validation(tmp_path, small_data, capsys):
    summary = run_training(tiny(small_data, per_device_batch_size=4, max_steps=2, val_every=1, val_split="none"),
                           tmp_path / "run")
    assert summary["step"] == 2 and read_metrics(tmp_path / "run", "val") == []
    assert "val_every 1 is ignored" in capsys.readouterr().out


def test_too_many_skipped_steps_end_the_run_with_an_error_after_saving(tmp_path, small_data, monkeypatch):
    import torch

    import grr_train.train.step as step

    real = step.contrastive_loss
    monkeypatch.setattr(step, "contrastive_loss", lambda *a, **k: real(*a, **k) * torch.tensor(float("nan")))
    from grr_train.train.trainer import NonFiniteLoss

    cfg = tiny(small_data, per_device_batch_size=4, max_steps=3, val_split="none", skip_nonfinite=True)
    with pytest.raises(NonFiniteLoss, match="3 of 3 steps"):
        run_training(cfg, tmp_path / "run")
    events = [r for r in read_metrics(tmp_path / "run", "event") if r.get("what") == "skip_nonfinite"]
    assert [e["num_skipped"] for e in events] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
