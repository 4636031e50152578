"""Where a sharded set lives: `location(value)` turns what a user gave into a local `Path`, or
refuses it in one line when it is a URL (`s3://`, `gs://`, `http://`, any `scheme://`).

A URL must never be taken for a local folder: `Path("s3://bucket/set")` is `s3:/bucket/set`, a
folder named `s3:` in the working directory, so a shard run into it would exit 0 having written
nothing to the bucket, and every later command would read that folder back. Only the standard
library, so any part of grr may import it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# RFC 3986's scheme, then `://`; a Windows drive (`C:\`, `C:/x`) has no `//` after the colon
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# what a URL becomes once something has passed it through Path(): `s3:/bucket/set`
_MANGLED = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:$")


def is_url(value: str | os.PathLike) -> bool:
    return bool(_URL.match(os.fspath(value)))


def location(value: str | os.PathLike, what: str = "a sharded set") -> Path:
    """`value` as a local path; ValueError (one line, naming it) for a URL, which this grr cannot
    read or write, and for a path that is a URL whose `//` was lost on the way (`s3:/bucket/x`)."""
    text = os.fspath(value)
    if match := _URL.match(text):
        raise ValueError(f"{text}: {what} at a {match.group(1)}:// URL is not supported by this grr; give a "
                         "local folder (copy the set there first)")
    first = Path(text).parts[0] if Path(text).parts else ""
    if _MANGLED.match(first):
        raise ValueError(f"{text}: looks like a URL whose '//' was lost ({first}/...); give a local folder "
                         "or the URL as it is")
    return Path(text)
