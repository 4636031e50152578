"""Counting and logging bad samples at a bounded rate, for every stage that skips them (the shard
run, both loaders): a set with a million broken images must not print a million lines, yet the
first ones of each kind are shown in full so they can be found and fixed."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable


class SkipLog:
    """Counts skips by reason; logs the first `first` of each reason in full, then at most one
    summary line every `interval_s` seconds."""

    def __init__(self, logger: logging.Logger, first: int = 5, interval_s: float = 60.0):
        self.counts: Counter[str] = Counter()
        self.log, self.first, self.interval_s = logger, first, interval_s
        self._last_summary = time.monotonic()

    def add(self, reason: str, where: str | Callable[[], str], detail: str) -> None:
        """`where` names the file and sample (a callable is called only when a line is logged:
        naming a sample can cost an index read)."""
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.first:
            self.log.warning("skipped %s (%s #%d): %s", where() if callable(where) else where, reason, n, detail)
            return
        now = time.monotonic()
        if now - self._last_summary >= self.interval_s:
            self._last_summary = now
            self.log.warning("skipped so far: %s (latest: %s, %s)", dict(self.counts),
                             where() if callable(where) else where, reason)
