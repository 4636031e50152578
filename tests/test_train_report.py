"""The run's start banner and end summary (grr_train/train/report.py): what a person reads in a log."""

import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

import torch

from grr_data.format.manifest import Manifest
from grr_train.model import get_config
from grr_train.train.config import TrainConfig
from grr_train.train.plan import BatchPlan
from grr_train.train.report import RunFacts, RunOutcome, end_summary, start_banner

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402


class FakeCpuLoader:
    name = "cpu"
    num_workers = 3


def test_banner_names_model_data_batch_devices_precision_compile_and_loader(tmp_path):
    make_shardset(tmp_path / "data", shard_sizes=(5, 5), split="train")
    data = Manifest.read(tmp_path / "data")
    cfg = replace(TrainConfig(), preset="grr-tiny", data=str(tmp_path / "data"), per_device_batch_size=2,
                  global_batch_size=8, max_steps=40, warmup_steps=5, lr_max=3e-4, lr_min=3e-6)
    plan = BatchPlan.for_run(cfg, world_size=2)
    model = get_config("grr-tiny", vocab_size=1000)
    lines = start_banner(RunFacts(cfg, tmp_path / "run", model, data, plan, steps_per_epoch=3, total_steps=40,
                                  start_step=12, resumed=True, device=torch.device("cpu"),
                                  autocast=torch.bfloat16, compile_mode="blocks", loader=FakeCpuLoader()))
    # grr-tiny at a 1,000-word vocabulary: 1,000,408 trainable parameters (`grr model summary grr-tiny`)
    assert lines == [
        f"== grr train pretrain: {tmp_path / 'run'} (resumed at step 12) ==",
        "  model      preset grr-tiny, 1,000,408 parameters, dropout 0.15",
        f"  data       {tmp_path / 'data'}: train 10 pairs; tokenizer test (vocabulary 1,000)",
        "  batch      global 8 = 2 micro-batches x 2 per process x 2 processes; contrastive batch 4",
        "  steps      40 (max_steps 40, 3 per epoch); lr 0.0003 -> 3e-06, warm-up 5 steps",
        "  devices    2 processes on cpu; precision bf16 autocast; compile blocks; parallelism ddp; loader cpu (3 workers)",
    ]


def test_summary_gives_time_rate_best_validation_and_where_the_checkpoints_are(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000060").mkdir(parents=True)
    (run / "checkpoints" / "best").mkdir()
    (run / "checkpoints" / "latest").write_text("step-0000060\n")
    records = [{"kind": "train", "step": 10, "loss": 0.5}, {"kind": "val", "step": 20, "loss": 2.5, "perplexity": 9.0},
               {"kind": "val", "step": 40, "loss": 1.25, "perplexity": 3.5}, {"kind": "val", "step": 60, "loss": 1.75}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # 30 steps of 64 samples in 48 s of steps: 40.0 samples/s; 3,725 s of wall time is 1:02:05
    outcome = RunOutcome("signal", step=60, epoch=4, steps_this_session=30, seconds=3725.2, step_seconds=48.0,
                         global_batch=64, signal=signal.SIGTERM, num_skipped=0)
    assert end_summary(run, outcome, "val") == [
        "== stopped by SIGTERM, checkpoint saved: step 60 (epoch 4); 30 steps in 1:02:05 this session, "
        "40.0 samples/s while training ==",
        "  best val loss 1.2500 at step 40 (perplexity 3.50)",
        f"  checkpoint {run / 'checkpoints' / 'step-0000060'}; best by validation {run / 'checkpoints' / 'best'}",
        f"  metrics    {run / 'metrics.jsonl'}",
        "  continue with the same command and --resume (or --auto-resume)",
    ]
    done = end_summary(run, replace(outcome, stop_reason="early_stop", signal=None, num_skipped=2), "val")
    assert done[0].startswith("== done: early stopping ended the run: step 60")
    assert "  skipped steps (non-finite): 2" in done
