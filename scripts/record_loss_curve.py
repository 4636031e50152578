"""Record the fixed-seed curves that tests/test_train_curve.py compares against.

Run it only when the training maths is meant to change (and say why in docs/LOG.md); it makes the
small photo set in a temporary folder, trains each run tests/loss_curve.py describes (grr-tiny,
16 steps; baseline-tiny, 6) and replaces their files in tests/data/ (each written to a temporary
name, then renamed). `--preset NAME` records one of them only.

    .venv/bin/python scripts/record_loss_curve.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from loss_curve import CURVES, KEYS, make_curve_data, provenance, run_curve  # noqa: E402


def record(preset: str, data: Path, work: Path) -> None:
    curve = run_curve(data, work / preset, preset=preset)
    path = CURVES[preset][0]
    steps = len(curve["loss"])
    content = {
        "what": f"per-step train metrics of the fixed-seed {preset} run in tests/loss_curve.py ({steps} steps)",
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "provenance": provenance(preset),
        "curve": curve,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp_path, path)
    print(f"wrote {path} ({steps} steps)")
    for step, values in enumerate(zip(*(curve[k] for k in KEYS), strict=True), start=1):
        print(f"step {step:2d}  " + "  ".join(f"{k} {v:.10g}" for k, v in zip(KEYS, values, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(CURVES), help="record this curve only (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_curve_data(Path(tmp) / "data")
        for preset in [args.preset] if args.preset else list(CURVES):
            record(preset, data, Path(tmp))


if __name__ == "__main__":
    main()
