"""The run's metrics log: `metrics.jsonl` (CONTRACTS.md "Metrics log") and TensorBoard if installed.

Only the process that writes (rank 0) opens one; the others get a log with `enabled=False`.
`read_metrics` is the one reader of the file, for the trainer's tests and `grr compare`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None):
        """`purge_step`: a resumed run's first new step; TensorBoard hides its events from there on."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(self.path, "a")  # noqa: SIM115  (kept open for the run)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                kwargs: dict[str, Any] = {} if purge_step is None else {"purge_step": purge_step}
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), **kwargs)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key in ("step", "kind", "time") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    tag = f"{record['kind']}/{record.get('split', '')}{'/' if 'split' in record else ''}{key}"
                    self._tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_metrics(run_dir: Path, after_step: int) -> int:
    """Drop records past `after_step` (a run resumed from an earlier checkpoint); returns how many."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if json.loads(line).get("step", -1) > after_step:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of a run folder's `metrics.jsonl` (or of that file), only `kind` ones if given.

    A line that is not JSON is reported by number.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err}); fix or remove that line") from err
    return [r for r in records if kind is None or r.get("kind") == kind]
