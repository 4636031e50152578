"""The LR schedule against the paper's rule written out independently (warm-up, then SGDR per epoch)."""

import math

import pytest

from grr_train.schedule import lr_at

HI, LO = 1e-4, 1e-6


def paper_lr(step, warmup, cycle, hi=HI, lo=LO):
    # Linear warm-up to hi over `warmup` steps (first step at hi/warmup), then cosine cycles of
    # `cycle` steps starting at hi right after warm-up (SequentialLR(LinearLR, CAWR) semantics).
    if step < warmup:
        return hi * (step + 1) / warmup
    t = step - warmup
    while t >= cycle:
        t -= cycle
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t / cycle))


@pytest.mark.parametrize("step", [0, 1, 999, 1998, 1999, 2000, 2001, 2500, 2999, 3000, 3001, 7777])
def test_pretrain_schedule_matches_formula(step):
    got = lr_at(step, lr_max=HI, lr_min=LO, warmup_steps=2000, cycle_steps=1000)
    assert got == pytest.approx(paper_lr(step, 2000, 1000), rel=1e-12)


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
