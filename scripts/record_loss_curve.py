"""Record the fixed-seed loss curve that tests/test_train_curve.py compares against.

Run it only when the training maths is meant to change (and say why in the commit); it makes
the small photo set in a temporary folder, trains as tests/loss_curve.py describes, and
replaces tests/data/loss_curve_grr_tiny.json (written to a temporary name, then renamed).

    .venv/bin/python scripts/record_loss_curve.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from loss_curve import CURVE_PATH, LOSS_KEYS, make_curve_data, provenance, run_curve  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = make_curve_data(Path(tmp) / "data")
        curve = run_curve(data, Path(tmp) / "run")
    record = {
        "what": "per-step train losses of the fixed-seed grr-tiny run in tests/loss_curve.py",
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "provenance": provenance(),
        "curve": curve,
    }
    CURVE_PATH.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = CURVE_PATH.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_path, CURVE_PATH)
    print(f"wrote {CURVE_PATH} ({len(curve['loss'])} steps)")
    for step, values in enumerate(zip(*(curve[k] for k in LOSS_KEYS), strict=True), start=1):
        print(f"step {step:2d}  " + "  ".join(f"{k} {v:.10f}" for k, v in zip(LOSS_KEYS, values, strict=True)))


if __name__ == "__main__":
    main()
