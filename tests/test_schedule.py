"""The LR schedule against torch's own schedulers for the paper's rule (warm-up, then SGDR per epoch)."""

import math

import pytest

from grr_train.train.schedule import lr_at

HI, LO = 1e-4, 1e-6


def torch_schedule(steps, warmup, cycle, hi=HI, lo=LO):
    """The learning rates torch's own schedulers give for the paper's rule: linear warm-up, then
    SGDR with one cycle per epoch (SequentialLR(LinearLR, CosineAnnealingWarmRestarts))."""
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=hi)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    sgdr = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cycle, eta_min=lo)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, sgdr], milestones=[warmup])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_pretrain_schedule_is_torchs_warmup_then_warm_restarts():
    expected = torch_schedule(4500, warmup=2000, cycle=1000)
    got = [lr_at(step, lr_max=HI, lr_min=LO, warmup_steps=2000, cycle_steps=1000) for step in range(4500)]
    assert got == pytest.approx(expected, rel=1e-9)


def test_warmup_meets_first_cycle_at_lr_max():
    kw = dict(lr_max=HI, lr_min=LO, warmup_steps=2000, cycle_steps=1000)
    assert lr_at(0, **kw) == pytest.approx(HI / 2000)
    assert lr_at(1999, **kw) == pytest.approx(HI)  # last warm-up step
    assert lr_at(2000, **kw) == pytest.approx(HI)  # first step of the first cycle
    assert lr_at(2000 + 999, **kw) == pytest.approx(LO + (HI - LO) * (1 + math.cos(math.pi * 999 / 1000)) / 2)
    assert lr_at(3000, **kw) == pytest.approx(HI)  # warm restart, W steps after an epoch boundary
    assert lr_at(2500, **kw) == pytest.approx((HI + LO) / 2)


def test_finetune_has_one_cycle_per_epoch_and_scales():
    kw = dict(lr_max=1e-5, lr_min=1e-7, warmup_steps=0, cycle_steps=50)
    assert lr_at(0, **kw) == pytest.approx(1e-5)
    assert lr_at(50, **kw) == pytest.approx(1e-5)
    assert lr_at(25, **kw) == pytest.approx((1e-5 + 1e-7) / 2)
    assert lr_at(25, **kw, scale=0.01) == pytest.approx((1e-7 + 1e-9) / 2)
    assert all(1e-7 <= lr_at(s, **kw) <= 1e-5 for s in range(200))
