"""Mistyped names: the known name closest to one the user typed, for errors that say what to type."""

from __future__ import annotations

import difflib


def did_you_mean(name: str, known) -> str:
    """" (did you mean 'x'?)" for the known name closest to a mistyped `name`, else ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""
