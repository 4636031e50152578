"""The trainer's guards on paths a user meets rarely but that cost a run when wrong (issue 21): a
non-finite step without skip_nonfinite ends the run naming the last good checkpoint;
max_skipped_fraction at its boundary; early stopping without a val split; resuming on data with
another number of steps per epoch, and on another world size whose contrastive batch differs (the
epoch restarts from its first batch)."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import grr_train.train.step as step_module
import grr_train.train.trainer as trainer_module
from grr_train.runs import checkpoint as ckpt
from grr_train.runs import weights
from grr_train.runs.metrics import read_metrics
from grr_train.train.settings import resume_config
from grr_train.train.trainer import NonFiniteLoss, run_training

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import reseal  # noqa: E402
from test_train import make_data, tiny  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), (6, 6), (4,))  # 12 train: 3 steps of 2 x 2 an epoch


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("small"), (4,), (4,))


def nan_at_calls(monkeypatch, calls: set[int]) -> None:
    """The step's contrastive loss is NaN at these (1-based) calls, one call per micro-batch."""
    real, count = step_module.contrastive_loss, [0]

    def contrastive_loss(*args, **kwargs):
        count[0] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if count[0] in calls else value

    monkeypatch.setattr(step_module, "contrastive_loss", contrastive_loss)


def test_a_non_finite_step_ends_the_run_naming_the_last_good_checkpoint(tmp_path, small_data, monkeypatch):
    nan_at_calls(monkeypatch, {3})  # one micro-batch a step: step 3
    run = tmp_path / "run"
    good = run / "checkpoints" / "step-0000002"
    with pytest.raises(NonFiniteLoss, match=rf"^step 3: loss nan / gradient norm nan is not finite; the last good "
                                            rf"checkpoint is {good} \(set skip_nonfinite=true to skip such steps"):
        run_training(tiny(small_data, per_device_batch_size=4, max_steps=5, val_split="none", checkpoint_every=2), run)
    assert ckpt.latest_checkpoint(run) == good  # what --resume continues from
    model, info = weights.load_model(good)
    assert info["step"] == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2]  # the failed step is not logged


def test_a_non_finite_first_step_says_there_is_no_checkpoint(tmp_path, small_data, monkeypatch):
    nan_at_calls(monkeypatch, {1})
    with pytest.raises(NonFiniteLoss, match=r"^step 1: .* no checkpoint was saved before it \(set skip_nonfinite"):
        run_training(tiny(small_data, per_device_batch_size=4, max_steps=2, val_split="none"), tmp_path / "run")


@pytest.mark.parametrize("fraction, fails", [(0.25, False), (0.24, True)])
def test_max_skipped_fraction_at_its_boundary(tmp_path, small_data, monkeypatch, fraction, fails):
    # 1 of 4 steps skipped: a fraction of exactly 0.25 is allowed, one below it is not
    nan_at_calls(monkeypatch, {2})
    cfg = tiny(small_data, per_device_batch_size=4, max_steps=4, val_split="none", skip_nonfinite=True,
               max_skipped_fraction=fraction)
    if fails:
        with pytest.raises(NonFiniteLoss, match=r"1 of 4 steps had a non-finite loss or gradient and were skipped, "
                                                r"more than max_skipped_fraction 0.24"):
            run_training(cfg, tmp_path / "run")
        assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-0000004"  # saved before failing
    else:
        summary = run_training(cfg, tmp_path / "run")
        assert summary["step"] == 4 and summary["num_skipped"] == 1 and summary["stop_reason"] == "max_steps"


def test_early_stopping_without_a_val_split_is_refused_before_training(tmp_path):
    data = make_data(tmp_path / "data", (4,))  # a train split only
    with pytest.raises(ValueError, match=rf"^{data / 'manifest.json'}: no 'val' split, which early stopping needs$"):
        run_training(tiny(data, per_device_batch_size=4, early_stop=True), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_on_data_with_another_number_of_steps_per_epoch_is_refused(tmp_path, data, small_data):
    run = tmp_path / "run"
    run_training(tiny(data, max_steps=1, val_split="none"), run)  # 3 steps an epoch
    latest = ckpt.latest_checkpoint(run)
    with pytest.raises(ValueError, match=rf"^{latest}: the data now gives 1 steps per epoch, the run had 3; "
                                         r"resume on the same data$"):
        run_training(resume_config(run, data=str(small_data), max_steps=2), run, resume=True)


def recorded_batches(monkeypatch) -> list[list[torch.Tensor]]:
    """The ids of each train step's micro-batches, in order."""
    steps, real = [], trainer_module.Trainer.train_step

    def recording(self, micro_batches):
        steps.append([b["ids"].clone() for b in micro_batches])
        return real(self, micro_batches)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", recording)
    return steps


@pytest.mark.slow  # 7 steps in 3 runs: ~8 s on an idle 2-core machine
def test_resume_on_another_world_size_with_another_contrastive_batch_restarts_the_epoch(
        tmp_path, data, monkeypatch, capsys):
    """A run saved at step 1 by 2 processes with micro-batch 2 (contrastive batch 4) resumes on 1
    process with contrastive batch 2: the plan's order differs, so epoch 0 restarts from its first
    batch. The 2-process save is written here by editing a 1-process checkpoint's meta.json (what
    a 2-process run records: world_size 2, contrastive_batch 4); the real 2-process resume with
    the same contrastive batch is tests/test_train_ddp.py's."""
    steps = recorded_batches(monkeypatch)
    cfg = tiny(data, val_split="none", dropout=0.0)
    run_training(replace(cfg, max_steps=3), tmp_path / "straight")  # epoch 0
    straight = list(steps)
    run = tmp_path / "run"
    run_training(replace(cfg, max_steps=1), run)
    folder = ckpt.latest_checkpoint(run)
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["world_size"], meta["contrastive_batch"], meta["step"]) == (1, 2, 1)
    meta.update(world_size=2, contrastive_batch=4, accumulation=1)
    (folder / "meta.json").write_text(json.dumps(meta))
    reseal(folder)
    del steps[:]
    capsys.readouterr()
    summary = run_training(resume_config(run, max_steps=4), run, resume=True)
    out = capsys.readouterr().out
    assert ("was saved by 2 processes and resumes on 1: the contrastive batch was 4, now 2: restarting epoch 0 "
            "from its beginning; from here the run is no longer bit-exact") in out
    assert summary["step"] == 4
    # steps 2, 3, 4 are epoch 0 again from its first batch: the straight run's steps 1, 2, 3
    assert len(steps) == 3
    for resumed, first in zip(steps, straight, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(resumed, first, strict=True))
    assert [(r["step"], r["epoch"]) for r in read_metrics(run, "train")] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    (event,) = [r for r in read_metrics(run, "event") if r["what"] == "resume_world_size"]
    assert (event["saved_world_size"], event["world_size"], event["same_order"]) == (2, 1, False)
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run, "train"))
