"""Two gloo processes (`--nproc-per-node 2`) against one process at the same global batch.

The loader plan gives global step s the same samples whatever the world size, the contrastive
negatives are gathered across ranks and the caption loss is normalised by the global token
count, so with dropout off the two runs compute the same losses and gradients up to float
summation order. Tolerance: 1e-4 relative on loss and gradient norm over 3 steps.
Also the peak-FLOPs table MFU divides by (parallel.py).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from grr_train.metrics_log import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_cli(data: Path, out: Path, nproc: int, per_device: int) -> None:
    cmd = [sys.executable, "-m", "cli.main", "train", "pretrain", "--preset", "grr-tiny", "--data", str(data),
           "--out", str(out), "--max-steps", "3", "--nproc-per-node", str(nproc)]
    for s in (f"per_device_batch_size={per_device}", "global_batch_size=4", "dropout=0", "num_workers=0",
              "loader=cpu", "warmup_steps=0", "lr_max=1e-3", "lr_min=1e-3", "tensorboard=false",
              "val_contrastive_batch_size=2", "val_batch_size=2"):
        cmd += ["--set", s]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one(tmp_path):
    data = make_data(tmp_path / "data", (12,), (4,))
    run_cli(data, tmp_path / "one", nproc=1, per_device=4)
    run_cli(data, tmp_path / "two", nproc=2, per_device=2)
    one, two = read_metrics(tmp_path / "one", "train"), read_metrics(tmp_path / "two", "train")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "contrastive", "caption", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    val_one, val_two = read_metrics(tmp_path / "one", "val"), read_metrics(tmp_path / "two", "val")
    assert val_two[0]["num_samples"] == val_one[0]["num_samples"] == 4
    assert val_two[0]["loss"] == pytest.approx(val_one[0]["loss"], rel=1e-4)
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000003"
    assert (ckpt / "model.safetensors").exists()  # rank 0 wrote it


def test_peak_flops_tells_h100_variants_apart(monkeypatch):
    import torch

    from grr_train.parallel import peak_flops

    cuda = torch.device("cuda", 0)
    for name, flops in (("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
                        ("NVIDIA H100 PCIe", 756e12), ("Some other GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, _n=name: _n)
        assert peak_flops(cuda) == flops, name
    assert peak_flops(torch.device("cpu")) is None
