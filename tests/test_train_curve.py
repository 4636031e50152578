"""A fixed-seed short training run must give the stored per-step losses (STYLE.md, torchtitan row).

A refactor of the model, losses, optimizer step, schedule or loader that changes the maths
fails here; one that only moves code does not. The run and the stored file are described in
`tests/loss_curve.py`; after an intended change of the maths, rerun
`.venv/bin/python scripts/record_loss_curve.py` and say why in the commit.

Tolerance, measured on the recording machine (16 steps, torch 2.13.0 CPU):
- 1 vs 2 intra-op threads (float reordering only): at most 2.1e-7 relative, on any loss;
- lr_max x 1.001: 4.9e-4 (loss), 8.4e-4 (contrastive); lr_max x 1.01: 5.0e-3 (loss);
- temperature x 1.01: 5.6e-3 (loss).
So RTOL = 1e-4 passes reordering with ~500x to spare and fails a 0.1% change of the lr. When
torch or Pillow (JPEG coding, resizing) differ from the recording, kernels and pixels may
differ a little, so the test still runs but with LOOSE_RTOL = 1e-3, which still fails a 1%
change of the lr or temperature; it prints which versions differ.
"""

import json
import sys
from pathlib import Path

import PIL
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loss_curve import CURVE_PATH, LOSS_KEYS, SETTINGS, compare, make_curve_data, run_curve  # noqa: E402

RTOL = 1e-4
LOOSE_RTOL = 1e-3
PERTURBED_STEPS = 6  # the perturbation check needs only a few steps to show


@pytest.fixture(scope="module")
def stored() -> dict:
    if not CURVE_PATH.is_file():
        pytest.fail(f"{CURVE_PATH} is missing; make it with .venv/bin/python scripts/record_loss_curve.py")
    record = json.loads(CURVE_PATH.read_text())
    if record["provenance"]["settings"] != SETTINGS:
        pytest.fail(f"{CURVE_PATH} was recorded with other settings than tests/loss_curve.py's SETTINGS; "
                    "rerun scripts/record_loss_curve.py if the change is intended")
    return record


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_curve_data(tmp_path_factory.mktemp("curve-data"))


def tolerance(provenance: dict) -> tuple[float, list[str]]:
    """(rtol, the library versions that differ from the recording's)."""
    here = {"torch": torch.__version__, "pillow": PIL.__version__}
    differ = [f"{k} {provenance[k]} (stored) vs {v} (here)" for k, v in here.items() if provenance[k] != v]
    return (LOOSE_RTOL if differ else RTOL), differ


def test_loss_curve_matches_the_stored_one(tmp_path, data, stored):
    rtol, differ = tolerance(stored["provenance"])
    if differ:
        print(f"versions differ from the recording ({'; '.join(differ)}): using rtol {rtol}")
    actual = run_curve(data, tmp_path / "run")
    problems = compare(actual, stored["curve"], rtol)
    assert not problems, (
        f"the fixed-seed losses moved (rtol {rtol}; {len(problems)} mismatches):\n" + "\n".join(problems[:12])
        + "\nIf the maths was meant to change, rerun scripts/record_loss_curve.py."
    )


def test_a_small_change_of_the_maths_fails_the_comparison(tmp_path, data, stored):
    # Guards against a tolerance that passes anything: a 1% higher learning rate, even at the
    # looser tolerance, must be caught within a few steps.
    actual = run_curve(data, tmp_path / "run", max_steps=PERTURBED_STEPS, lr_max=SETTINGS["lr_max"] * 1.01)
    expected = {k: stored["curve"][k][:PERTURBED_STEPS] for k in LOSS_KEYS}
    assert len(actual["loss"]) == PERTURBED_STEPS
    assert actual["loss"][0] == pytest.approx(expected["loss"][0], rel=RTOL)  # the lr acts from step 2 on
    assert compare(actual, expected, LOOSE_RTOL)


def test_tolerance_loosens_only_when_versions_differ(stored):
    same = {**stored["provenance"], "torch": torch.__version__, "pillow": PIL.__version__}
    assert tolerance(same) == (RTOL, [])
    rtol, differ = tolerance({**same, "torch": "0.0.0"})
    assert rtol == LOOSE_RTOL and differ == [f"torch 0.0.0 (stored) vs {torch.__version__} (here)"]
