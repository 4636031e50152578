"""Starts refused in one line with what to do, and what they leave behind (issue 22): the DALI
loader without DALI or a GPU, a start refused during set-up (no empty run folder), settings that
run but were likely not meant (warm-up past the run's end, the paper's batch on a CPU), and a
damaged checkpoint's warning said once however often a command looks the checkpoint up."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from grr_cli.main import app
from grr_train.train.config import TrainConfig
from grr_train.train.plan import BatchPlan
from grr_train.train.setup import setting_warnings

sys.path.insert(0, str(Path(__file__).parent))


def grr(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return result.exit_code, lines[0]


def test_dali_without_a_gpu_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, line = grr("train", "pretrain", "--loader", "dali", "--data", tmp_path / "d", "--out", tmp_path / "run")
    assert code == 1
    assert line == "error: the DALI loader needs a CUDA GPU and none is usable here: use --loader cpu (or auto)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cuda, advice", [
    ("12.8", "pip install 'grr-coca[gpu-cu12]' (torch is built for CUDA 12.8), or use --loader cpu"),
    ("13.0", "pip install 'grr-coca[gpu-cu13]' (torch is built for CUDA 13.0), or use --loader cpu"),
    ("11.8", "whose extras are for CUDA 12 (gpu-cu12) and 13 (gpu-cu13), but torch is built for CUDA 11.8"),
])
def test_dali_missing_names_the_extra_for_torchs_cuda(tmp_path, monkeypatch, cuda, advice):
    import grr_data.loader.dali

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(grr_data.loader.dali, "dali_available", lambda: False)
    _, line = grr("train", "pretrain", "--set", "loader=dali", "--data", tmp_path / "d", "--out", tmp_path / "run")
    assert line.startswith("error: the DALI loader needs NVIDIA DALI") and advice in line
    assert not (tmp_path / "run").exists()


def test_a_start_refused_during_setup_leaves_no_run_folder(tmp_path):
    """Early stopping on a set without a val split is refused once the trainer reads the set, after
    the run folder's lock was taken (which made the folder)."""
    from tiny_run import make_set

    data, _ = make_set(tmp_path)
    code, line = grr("train", "pretrain", "--preset", "grr-tiny", "--data", data, "--out", tmp_path / "run",
                     "--set", "early_stop=true", "--set", "loader=cpu", "--set", "num_workers=0")
    assert code == 1 and line == f"error: {data / 'manifest.json'}: no 'val' split, which early stopping needs"
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before is left as it was
    grr("train", "pretrain", "--preset", "grr-tiny", "--data", data, "--out", tmp_path / "kept",
        "--set", "early_stop=true", "--set", "loader=cpu", "--set", "num_workers=0")
    assert (tmp_path / "kept").is_dir()


def plan(cfg, world_size=1):
    return BatchPlan.for_run(cfg, world_size)


def test_warmup_past_the_runs_end_and_the_papers_batch_on_a_cpu_are_warned():
    cfg = replace(TrainConfig(), lr_max=1e-4, warmup_steps=2000)
    warnings = setting_warnings(cfg, plan(cfg), torch.device("cpu"), total_steps=50)
    # 50 of 2,000 warm-up steps: the rate reaches 1e-4 x 50 / 2,000 = 2.5e-06
    assert warnings == [
        "warning: warmup_steps 2000 is longer than the run's 50 steps: the learning rate peaks at 2.5e-06, never "
        "reaching lr_max 0.0001; set --set warmup_steps=5 (a tenth of the run) or train longer",
        "warning: a global batch of 768 on a CPU (the paper's GPU recipe): every step computes all 768 samples, so "
        "steps are slow; to try things out set --set global_batch_size=32 --set contrastive_batch_size=32 "
        "(grr demo's batch), or train on a GPU"]
    small = replace(cfg, global_batch_size=32, contrastive_batch_size=32, warmup_steps=5)
    assert setting_warnings(small, plan(small), torch.device("cpu"), total_steps=50) == []
    assert setting_warnings(cfg, plan(cfg), torch.device("cuda"), total_steps=5000) == []


def test_a_damaged_checkpoints_warning_is_said_once(tmp_path, capsys):
    """A resume looks the newest checkpoint up in the trainer and again for the model; `grr eval`
    and `grr caption` for the tokenizer and the weights: the warning comes once."""
    from test_faults_checkpoint import flip_byte, two_checkpoints, weights_data_offset

    from grr_train.runs import checkpoint as ckpt
    from grr_train.runs import weights

    two_checkpoints(tmp_path)
    damaged = tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"
    flip_byte(damaged, weights_data_offset(damaged))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"
    assert weights.load_model(tmp_path)[1]["step"] == 1
    err = capsys.readouterr().err
    assert err.count(f"{damaged} is damaged") == 1, err
