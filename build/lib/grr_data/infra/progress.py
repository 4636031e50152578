"""Progress on the console: a tqdm bar on a terminal, plain lines where output is kept (Slurm, nohup, a pipe).

A bar redraws itself with carriage returns several times a second; in a file each redraw stays,
so a demo's training log grew to 210 KB of which 42 lines were useful (issue 22). `progress(...)`
is the one factory every command's progress goes through (training, validation, shard, check,
fetch, eval, demo): when the stream it writes to is a terminal it returns a tqdm bar, otherwise a
`LineProgress` that writes one plain line for each of the first `first` updates, then one every
`every_n` updates or `every_s` seconds (whichever comes first), and a last line when it closes,
each with the count, the postfix (a training step's loss, lr, samples/s), the rate and the ETA.

`GRR_PROGRESS=bars|lines|auto` forces one kind (auto: by the stream); `GRR_PROGRESS_EVERY_S`
changes the default interval of the lines (30 s). Messages between updates go through
`tqdm.write` either way (it prints plainly when no bar is drawn).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

DEFAULT_EVERY_S = 30.0
MODES = ("auto", "bars", "lines")


def lines_wanted(stream=None) -> bool:
    """Whether progress goes out as plain lines: GRR_PROGRESS says so, or `stream` (stderr) is no terminal."""
    mode = os.environ.get("GRR_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"GRR_PROGRESS={mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "lines"
    stream = stream if stream is not None else sys.stderr
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return True


def default_every_s() -> float:
    text = os.environ.get("GRR_PROGRESS_EVERY_S")
    if not text:
        return DEFAULT_EVERY_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"GRR_PROGRESS_EVERY_S={text!r}: expected a number of seconds") from None
    if value < 0:
        raise ValueError(f"GRR_PROGRESS_EVERY_S={text!r}: expected 0 or more seconds")
    return value


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = True, unit_scale: bool = False, every_n: int | None = None,
             every_s: float | None = None, first: int = 0, initial: int = 0, stream=None, **bar_options):
    """A tqdm bar on a terminal, else a `LineProgress` with the same methods (update, set_postfix,
    close, iteration, `with`). `every_n`/`every_s`/`first` shape the lines only; `bar_options` go to
    tqdm only (position, dynamic_ncols, ...)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    stream = stream if stream is not None else sys.stderr
    if not lines_wanted(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
                    unit_scale=unit_scale, initial=initial, file=stream, **bar_options)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
                        unit_scale=unit_scale, every_n=every_n,
                        every_s=default_every_s() if every_s is None else every_s,
                        first=first, initial=initial, stream=stream)


class LineProgress:
    """Plain progress lines: no carriage return, no redraw; see the module docstring for when."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", disable=False, leave=True,
                 unit_scale=False, every_n=None, every_s=DEFAULT_EVERY_S, first=0, initial=0, stream=None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.leave, self.unit_scale = disable, leave, unit_scale
        self.every_n, self.every_s, self.first = every_n, every_s, first
        self.stream = stream if stream is not None else sys.stderr
        self.n = self.start_n = self._last_line_n = initial
        self.postfix: dict = {}
        self.start_t = self._last_line_t = time.monotonic()
        self._updates = 0
        self._first_update: tuple[float, float] | None = None  # (n, time) after the first update
        self._closed = False
        self.lines_written = 0

    # ---- tqdm's interface, as far as grr uses it ---------------------------------------------

    def update(self, n: float = 1) -> None:
        if self.disable or self._closed:
            return
        self.n += n
        self._updates += 1
        now = time.monotonic()
        if self._first_update is None:
            self._first_update = (self.n, now)
        if (self._updates <= self.first
                or (self.every_n and self.n - self._last_line_n >= self.every_n)
                or (self.every_s is not None and now - self._last_line_t >= self.every_s)):
            self._line(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def refresh(self) -> None:
        pass  # a line goes out when one is due, from update()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.leave and self.n != self._last_line_n:
            self._line(time.monotonic(), done=True)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def write(text: str, file=None) -> None:
        tqdm.write(text, file=file)

    # ---- the line ------------------------------------------------------------------------------

    def _line(self, now: float, done: bool = False) -> None:
        self._last_line_n, self._last_line_t = self.n, now
        self.stream.write(self.format(now - self.start_t, done) + "\n")
        self.stream.flush()
        self.lines_written += 1

    def format(self, elapsed: float, done: bool = False) -> str:
        """`desc: unit N/TOTAL (P%) | postfix | rate unit/s, elapsed H:MM:SS, ETA H:MM:SS`."""
        count = _amount(self.n, self.unit_scale)
        if self.total:
            count += f"/{_amount(self.total, self.unit_scale)} ({100 * self.n / self.total:.0f}%)"
        head = f"{self.desc}: " if self.desc else ""
        parts = [f"{head}{self.unit} {count}"]
        if self.postfix:
            parts.append(" ".join(f"{k} {v}" for k, v in self.postfix.items()))
        timing = f"elapsed {_clock(elapsed)}"
        rate = self._rate(self.start_t + elapsed)
        if rate:
            timing = f"{_amount(rate, self.unit_scale, rate=True)} {self.unit}/s, " + timing
            if self.total and not done:
                timing += f", ETA {_clock(max(self.total - self.n, 0) / rate)}"
        parts.append(timing + (", done" if done else ""))
        return " | ".join(parts)


    def _rate(self, now: float) -> float | None:
        """Units per second since the first update (the first one holds warm-up: compilation, the
        loader's first batch), or since the start while only one update has come."""
        if self._first_update is not None and self.n > self._first_update[0] and now > self._first_update[1]:
            return (self.n - self._first_update[0]) / (now - self._first_update[1])
        if self.n > self.start_n and now > self.start_t:
            return (self.n - self.start_n) / (now - self.start_t)
        return None


def _amount(value: float, scale: bool, rate: bool = False) -> str:
    if scale:  # bytes and the like: 1.5M
        for suffix in ("", "k", "M", "G", "T"):
            if abs(value) < 1000:
                return f"{value:.1f}{suffix}" if suffix or rate else f"{value:.0f}"
            value /= 1000
        return f"{value:.1f}P"
    if rate:
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def say(text: str) -> None:
    """A message between progress updates: above a bar on a terminal, a plain line elsewhere; flushed,
    so that in a log file it stands in order with the progress lines (stdout is block-buffered there)."""
    tqdm.write(text)
    sys.stdout.flush()
