"""`grr demo`'s plan from the device (grr_train/demo/sizing.py): the CPU plans on a CPU; on a GPU
larger presets, more pairs and three seeds, by the card's memory, with the card named in the
report. Tested with faked device descriptions: this machine has no GPU, and the GPU sizes are
still to be measured on one."""

from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from grr_train.demo import sizing
from grr_train.demo.run import _finetune_settings, _pretrain_settings
from grr_train.demo.sizing import FULL, QUICK, DeviceInfo, choose_plan
from grr_train.train.settings import resolve_config

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 85.0)


def test_a_cpu_gets_the_cpu_plans():
    cpu = DeviceInfo("cpu", "cpu", 0.0)
    assert choose_plan(cpu) == FULL and choose_plan(cpu, quick=True) == QUICK
    assert FULL.presets == ("baseline-tiny-p16", "grr-tiny-p16") and FULL.seeds == (0,)
    assert choose_plan(cpu, seeds=3).seeds == (0, 1, 2)


@pytest.mark.parametrize("memory, presets, pairs, batch", [
    (85.0, ("baseline-small-p16", "grr-small-p16"), 20000, 128),  # H100 80 GB
    (40.0, ("baseline-small-p16", "grr-small-p16"), 20000, 128),  # A100 40 GB: the tier's floor
    (24.0, ("baseline-small-p16", "grr-small-p16"), 10000, 64),   # L4, A10, RTX 4090
    (8.0, ("baseline-tiny-p16", "grr-tiny-p16"), 6000, 64),       # a small card
])
def test_a_gpu_gets_larger_models_more_pairs_and_three_seeds_by_its_memory(memory, presets, pairs, batch):
    plan = choose_plan(DeviceInfo("cuda", "Some GPU", memory))
    assert (plan.presets, plan.num_pairs, plan.batch_size, plan.seeds) == (presets, pairs, batch, (0, 1, 2))
    assert plan.device_name == f"Some GPU ({memory:.0f} GB)"
    assert plan.pretrain_steps > FULL.pretrain_steps and plan.num_workers > FULL.num_workers


def test_quick_on_a_gpu_is_a_tenth_with_one_seed_and_seeds_override():
    quick = choose_plan(H100, quick=True)
    assert (quick.presets, quick.batch_size) == (("baseline-small-p16", "grr-small-p16"), 128)
    assert (quick.num_pairs, quick.pretrain_steps, quick.finetune_steps, quick.seeds) == (2000, 300, 30, (0,))
    assert choose_plan(H100, seeds=5).seeds == (0, 1, 2, 3, 4)


def test_the_device_is_described_from_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="NVIDIA H200", total_memory=150_000_000_000))
    assert DeviceInfo.of("cuda") == DeviceInfo("cuda", "NVIDIA H200", 150.0)
    assert DeviceInfo.of("cpu") == DeviceInfo("cpu", "cpu", 0.0)


def test_every_gpu_plans_settings_are_valid_for_its_presets():
    for _, plan in sizing.GPU_TIERS:
        for preset in plan.presets:
            for recipe, settings in (("pretrain", _pretrain_settings(plan, 0, 600)),
                                     ("finetune", _finetune_settings(plan, 0, 600))):
                extra = {"init_from": "x"} if recipe == "finetune" else {"preset": preset}
                cfg = resolve_config(recipe, None, settings, **extra)
                assert cfg.global_batch_size == plan.batch_size and cfg.num_workers == plan.num_workers


def test_grr_demo_on_a_gpu_runs_the_gpu_plan_and_names_the_card(monkeypatch, tmp_path):
    import grr_train.demo.run
    import grr_train.runtime.device
    from grr_cli.main import app
    from grr_train.demo.report import preface

    monkeypatch.setattr(grr_train.runtime.device, "resolve_device", lambda name: "cuda")
    monkeypatch.setattr(sizing.DeviceInfo, "of", classmethod(lambda cls, device: H100))
    seen = []

    def run_demo(out, plan, say):
        seen.append(plan)
        (tmp_path / "r.md").write_text("report")
        return {"markdown": str(tmp_path / "r.md")}

    monkeypatch.setattr(grr_train.demo.run, "run_demo", run_demo)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert seen[0] == choose_plan(H100)
    text = preface(num_pairs=20000, splits={"train": 16000, "val": 2000, "test": 2000}, pretrain_steps=3000,
                   finetune_steps=300, batch_size=128, seeds=[0, 1, 2], minutes=9.5, grid=None, kinds={},
                   parameters=(22_000_000, 22_100_000), device=seen[0].device_name, presets=seen[0].presets)
    assert ("Two models (baseline-small-p16 and grr-small-p16: 22,000,000 and 22,100,000 parameters) trained on "
            "NVIDIA H100 80GB HBM3 (85 GB) for 10 minutes") in text
    assert "Models of 22 million parameters" in text
