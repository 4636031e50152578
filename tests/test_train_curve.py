"""Fixed-seed short training runs must give the stored per-step curves (STYLE.md, torchtitan row).

A refactor of the model, losses, optimizer step, schedule or loader that changes the maths fails
here; one that only moves code does not. The runs and the stored files are described in
`tests/loss_curve.py` (grr-tiny 16 steps, baseline-tiny 6; each step's loss, contrastive and
caption losses, gradient norm and learning rate); after an intended change of the maths, rerun
`.venv/bin/python scripts/record_loss_curve.py` and say why in docs/LOG.md.

Tolerance, measured on the recording machine (torch 2.13.0+cpu, 1 intra-op thread):
- 1 vs 2 intra-op threads (float reordering only): at most 1.9e-7 relative on a loss, 1.5e-6 on
  the gradient norm;
- lr_max x 1.001: 5.2e-4 (loss), 4.7e-3 (gradient norm); weight decay 0.3 -> 0: 3.5e-4 (loss),
  5.2e-3 (gradient norm).
So RTOL = 1e-4 passes reordering with ~70x to spare and fails a 0.1% change of the lr or a dropped
weight decay. It applies wherever the same torch build runs: the same base version and build kind
(cpu, cuda, rocm; `+cpu` and `+cu128` labels aside). Another build may compile its CPU kernels
differently, so there the test runs with LOOSE_RTOL = 1e-3, which still fails a 1% change of the lr
and a dropped weight decay (through the gradient norm); it says which builds differ. (CI installs
torch from the package index: on Linux x86_64 a CUDA build, so CI compares loosely against this
CPU-build recording.) Pillow decodes the photos; a different Pillow is reported, not loosened for.
"""

import json
import sys
from dataclasses import fields
from pathlib import Path

import PIL
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from loss_curve import (  # noqa: E402
    CURVES,
    KEYS,
    SETTINGS,
    compare,
    make_curve_data,
    run_curve,
    torch_build,
    unpinned_fields,
)

from grr_train.train.config import TrainConfig  # noqa: E402

RTOL = 1e-4
LOOSE_RTOL = 1e-3
PERTURBED_STEPS = 6  # the learning-rate perturbation needs only a few steps to show


def read_stored(preset: str) -> dict:
    path = CURVES[preset][0]
    if not path.is_file():
        pytest.fail(f"{path} is missing; make it with .venv/bin/python scripts/record_loss_curve.py")
    record = json.loads(path.read_text())
    problems = settings_problems(record["provenance"])
    if problems:
        pytest.fail(f"{path} was recorded with other settings than tests/loss_curve.py's ({'; '.join(problems)}); "
                    "rerun scripts/record_loss_curve.py if the change is intended")
    return record


def settings_problems(provenance: dict) -> list[str]:
    """How the settings a curve was recorded with differ from SETTINGS. A field SETTINGS names that
    the recording did not (a field added since) must hold TrainConfig's default, which the
    recording ran with."""
    stored, default = provenance["settings"], TrainConfig()
    problems = [f"{k}: {stored[k]!r} recorded, {SETTINGS.get(k, '(not named)')!r} now"
                for k in stored if SETTINGS.get(k, object()) != stored[k]]
    problems += [f"{k}: {SETTINGS[k]!r} now, not recorded (the default {getattr(default, k)!r} ran)"
                 for k in SETTINGS if k not in stored and SETTINGS[k] != getattr(default, k)]
    return problems


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_curve_data(tmp_path_factory.mktemp("curve-data"))


def tolerance(provenance: dict) -> tuple[float, str]:
    """(rtol, why): strict on the recording's torch build, loose on another."""
    here = torch_build()
    stored = {k: provenance.get(k) for k in here}
    note = "" if provenance.get("pillow") == PIL.__version__ else \
        f"; Pillow {provenance.get('pillow')} recorded, {PIL.__version__} here"
    if stored == here:
        return RTOL, f"strict: the recording's torch build, {here['torch_base']} {here['torch_build']}{note}"
    return LOOSE_RTOL, (f"loose: torch {stored['torch_base']} {stored['torch_build']} recorded, "
                        f"{here['torch_base']} {here['torch_build']} here{note}")


def test_the_settings_name_every_training_field():
    assert unpinned_fields() == set(), "add these TrainConfig fields to tests/loss_curve.py's SETTINGS"
    assert {f.name for f in fields(TrainConfig)} - set(SETTINGS) == {"data"}


@pytest.mark.parametrize("preset", list(CURVES))
def test_curve_matches_the_stored_one(tmp_path, data, preset):
    stored = read_stored(preset)
    rtol, why = tolerance(stored["provenance"])
    print(f"{preset}: rtol {rtol} ({why})")
    actual = run_curve(data, tmp_path / "run", preset=preset)
    problems = compare(actual, stored["curve"], rtol)
    assert not problems, (
        f"{preset}: the fixed-seed curve moved (rtol {rtol}, {why}; {len(problems)} mismatches):\n"
        + "\n".join(problems[:12]) + "\nIf the maths was meant to change, rerun scripts/record_loss_curve.py."
    )


def test_the_curves_pin_what_they_say():
    grr, base = read_stored("grr-tiny"), read_stored("baseline-tiny")
    assert len(grr["curve"]["loss"]) == 16 and len(base["curve"]["loss"]) == 6
    assert set(grr["curve"]) == set(base["curve"]) == set(KEYS)
    # warm-up over 2 steps, then per-epoch cosine cycles of 4 steps from 1e-3 to 1e-4
    assert grr["curve"]["lr"][:3] == pytest.approx([5e-4, 1e-3, 1e-3], rel=1e-12)
    assert base["curve"]["lr"] == pytest.approx(grr["curve"]["lr"][:6], rel=1e-12)
    # the loss is eq. 6 of the stored parts with the pinned weights, not 1 and 1
    for curve in (grr["curve"], base["curve"]):
        for loss, con, cap in zip(curve["loss"], curve["contrastive"], curve["caption"], strict=True):
            assert loss == pytest.approx(1.6 * con + 0.7 * cap, rel=1e-12)
    assert base["curve"]["loss"][:6] != grr["curve"]["loss"][:6]  # another tower


def test_a_small_change_of_the_lr_fails_the_comparison(tmp_path, data):
    # Guards against a tolerance that passes anything: a 1% higher learning rate, even at the
    # looser tolerance, must be caught within a few steps.
    stored = read_stored("grr-tiny")
    actual = run_curve(data, tmp_path / "run", max_steps=PERTURBED_STEPS, lr_max=SETTINGS["lr_max"] * 1.01)
    expected = {k: stored["curve"][k][:PERTURBED_STEPS] for k in KEYS}
    assert len(actual["loss"]) == PERTURBED_STEPS
    assert actual["loss"][0] == pytest.approx(expected["loss"][0], rel=RTOL)  # the lr acts from step 2 on
    assert compare(actual, expected, LOOSE_RTOL)


@pytest.mark.slow  # a whole 16-step run
@pytest.mark.parametrize("change", [dict(weight_decay=0.0), dict(lambda_cap=1.0)], ids=["no-decay", "lambda_cap-1"])
def test_a_dropped_weight_decay_or_caption_weight_fails_the_comparison(tmp_path, data, change):
    # even at the loose tolerance (the weight decay through the gradient norm: 5.2e-3 relative)
    stored = read_stored("grr-tiny")
    assert compare(run_curve(data, tmp_path / "run", **change), stored["curve"], LOOSE_RTOL)


def test_tolerance_loosens_only_for_another_torch_build():
    here = torch_build()
    same = {**here, "torch": "2.13.0+whatever", "pillow": PIL.__version__}
    assert tolerance(same)[0] == RTOL
    assert tolerance({**same, "pillow": "1.0"})[0] == RTOL  # reported only
    assert "Pillow 1.0 recorded" in tolerance({**same, "pillow": "1.0"})[1]
    rtol, why = tolerance({**same, "torch_base": "0.0.0"})
    assert rtol == LOOSE_RTOL and why.startswith(f"loose: torch 0.0.0 {here['torch_build']} recorded")
    other_kind = "cuda" if here["torch_build"] != "cuda" else "cpu"
    assert tolerance({**same, "torch_build": other_kind})[0] == LOOSE_RTOL


def test_a_recording_without_a_field_added_since_still_counts_if_it_ran_the_default():
    record = read_stored("grr-tiny")["provenance"]
    older = {**record, "settings": {k: v for k, v in record["settings"].items() if k != "break_lock"}}
    assert settings_problems(older) == []  # break_lock's pinned value is the default
    older = {**record, "settings": {k: v for k, v in record["settings"].items() if k != "weight_decay"}}
    assert settings_problems(older) == ["weight_decay: 0.3 now, not recorded (the default 0.001 ran)"]
    changed = {**record, "settings": {**record["settings"], "lambda_cap": 1.0}}
    assert settings_problems(changed) == ["lambda_cap: 1.0 recorded, 0.7 now"]
