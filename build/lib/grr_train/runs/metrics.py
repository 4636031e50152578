"""The run's metrics log: `metrics.jsonl` (CONTRACTS.md "Metrics log"), TensorBoard if installed, and
Weights & Biases when a run asks for it (grr_train/runs/wandb_sink.py).

Training and validation records go to all three under the same names (`train/loss`,
`val/perplexity`); the run's settings go to TensorBoard as a text table and to W&B as its config,
and example captions at each validation (`log_captions`) to both as a table.
Only the process that writes (rank 0) opens one; the others get a log with `enabled=False`.
`read_metrics` is the one reader of the file, for the trainer's tests and `grr compare`.

A crash (or a full disk) can leave the last line torn: not JSON and without its newline. Readers
drop such a line with a warning; any other line that is not JSON is an error naming the file and line.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from grr_data.infra.files import write_text_atomic
from grr_train.runs.wandb_sink import WandbSink

# Records are flushed at once and fsync'ed at most this often (and on `sync` and `close`): an
# fsync costs 0.5-3.5 ms on the dev machine's disk, more on network file systems, per record.
SYNC_EVERY_S = 10.0


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None, wandb: dict | None = None):
        """`purge_step`: a resumed run's first new step; TensorBoard hides its events from there on.
        `wandb`: WandbSink's project, entity, mode and config, when the run logs to W&B (a resumed
        run, one with a purge_step, continues its W&B run)."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        _end_with_a_whole_line(self.path)  # so the first record does not join a torn one
        self._file = open(self.path, "a")  # noqa: SIM115  (kept open for the run)
        self._last_sync = time.monotonic()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                kwargs: dict[str, Any] = {} if purge_step is None else {"purge_step": purge_step}
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), **kwargs)
        if wandb:
            self._wandb = WandbSink(Path(run_dir), resume=purge_step is not None, **wandb)

    @property
    def has_viewers(self) -> bool:
        """Whether TensorBoard or W&B receive what is logged (example captions cost a decode)."""
        return self._tb is not None or self._wandb is not None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
            if time.monotonic() - self._last_sync >= SYNC_EVERY_S:
                self.sync()
        except OSError as err:
            raise _explain(err, self.path) from err
        if self.has_viewers and "step" in record and record.get("kind") in ("train", "val"):
            # "train/loss", "val/perplexity" (a validation record's tag group is its split's name)
            group = record.get("split") or record["kind"]
            scalars = {f"{group}/{key}": value for key, value in record.items()
                       if key not in ("step", "kind", "time", "epoch") and not isinstance(value, bool)
                       and isinstance(value, (int, float)) and math.isfinite(value)}
            for tag, value in scalars.items():
                if self._tb is not None:
                    self._tb.add_scalar(tag, value, record["step"])
            if self._wandb is not None:
                self._wandb.log(scalars, step=record["step"])

    def log_settings(self, settings: dict) -> None:
        """The run's settings as a TensorBoard text table (W&B has them as its config already)."""
        if self._tb is not None:
            rows = "\n".join(f"| {group}.{key} | {value} |" for group, values in settings.items()
                             for key, value in values.items())
            self._tb.add_text("settings", "| setting | value |\n|---|---|\n" + rows, 0)

    def log_captions(self, step: int, tag: str, rows: list[tuple[str, str, str]]) -> None:
        """A few (sample, reference, generated) captions, as a table at `step`."""
        if self._tb is not None:
            text = "\n".join(f"| {key} | {ref} | {gen} |" for key, ref, gen in rows)
            self._tb.add_text(tag, "| sample | reference | generated |\n|---|---|---|\n" + text, step)
        if self._wandb is not None:
            self._wandb.log_table(tag, ["sample", "reference", "generated"], [list(r) for r in rows], step)

    def sync(self) -> None:
        """Make every record logged so far durable (call before saving a checkpoint)."""
        if self._file is None:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            raise _explain(err, self.path) from err
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            try:
                self.sync()
            finally:
                self._file.close()
                self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


def _explain(err: OSError, path: Path) -> OSError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(err.errno, f"No space left on device while writing {path}; free space on that disk, "
                                  "then continue with --resume")
    return err


def _end_with_a_whole_line(path: Path) -> None:
    """Cut a torn last line off `path` (with a warning), or end a whole one with its newline."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    data = path.read_bytes()
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
        ending = b"\n"
    except ValueError:
        number = data.count(b"\n") + 1
        print(f"warning: {path}:{number}: dropping a torn last line (a crash or a full disk "
              "while writing it)", file=sys.stderr)
        ending = None
    with open(path, "r+b") as f:
        if ending is None:
            f.truncate(start)
        else:
            f.seek(0, os.SEEK_END)
            f.write(ending)
        f.flush()
        os.fsync(f.fileno())


def _records(path: Path) -> list[tuple[str, dict]]:
    """Each line of `path` with its record. A torn last line (not JSON, no newline: what a crash
    leaves) is dropped with a warning; any other bad line raises ValueError naming file and line."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if number < len(lines) or text.endswith("\n"):
                raise ValueError(f"{path}:{number}: not a JSON line ({err}); fix or remove that line") from err
            print(f"warning: {path}:{number}: dropping a torn last line (a crash or a full disk while "
                  "writing it)", file=sys.stderr)
    return out


def truncate_metrics(run_dir: Path, after_step: int) -> int:
    """Drop records past `after_step` (a run resumed from an earlier checkpoint) and a torn last
    line; returns how many records were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    records = _records(path)
    kept = [line for line, record in records if record.get("step", -1) <= after_step]
    try:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    except OSError as err:
        raise _explain(err, path) from err
    return len(records) - len(kept)


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of a run folder's `metrics.jsonl` (or of that file), only `kind` ones if given."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [r for _, r in _records(path) if kind is None or r.get("kind") == kind]
