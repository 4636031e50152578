"""The object store's client, for grr_data.infra.store: the fsspec filesystem of each process,
the endpoint as configured (for messages), and the retry policy that store's docstring states:
which failures may pass, the backoff between tries, the budget (`GRR_STORE_RETRY_S`), and the
errors raised when a store refuses (`StoreError`) or does not answer in time (`StoreUnavailable`).
A location here is a `store.StorePath` (its `scheme`, `key` and `url`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("grr_data.infra.store")
T = TypeVar("T")
DEFAULT_RETRY_S = 120.0
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 15.0


class StoreError(OSError):
    """A store refused a request (access denied, no credentials, no such bucket), or cannot be used."""


class StoreUnavailable(StoreError):
    """A store did not answer within the retry budget; the message names the URL and the endpoint."""


_filesystems: dict[tuple[int, str, str], object] = {}
_fs_lock = threading.Lock()
_OPTIONS = {
    # no listings cache: a shard deleted or replaced in the store must be seen as it is now;
    # timeouts so that a dead endpoint fails a try in seconds; one attempt per try (no botocore
    # retries, s3fs's set to 1 below), since the retries and their budget are this module's
    "s3": {"use_listings_cache": False,
           "config_kwargs": {"connect_timeout": 10, "read_timeout": 60,
                             "retries": {"max_attempts": 1, "mode": "standard"}}},
}
_ATTRIBUTES = {"s3": {"retries": 1}}


# what configures a store's client: a filesystem is made again when one of them changes
_CONFIG_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "STORAGE_EMULATOR_HOST",
               "GOOGLE_APPLICATION_CREDENTIALS")


def filesystem(scheme: str):
    """The store's fsspec filesystem for this process and configuration (one made before a fork is
    not used after it: its connections and event loop belong to the parent)."""
    config = hashlib.sha256("\0".join(os.environ.get(name, "") for name in _CONFIG_ENV).encode()).hexdigest()
    key = (os.getpid(), scheme, config)
    with _fs_lock:
        if key not in _filesystems:
            import fsspec

            fs = fsspec.filesystem(scheme, skip_instance_cache=True, **_OPTIONS.get(scheme, {}))
            for name, value in _ATTRIBUTES.get(scheme, {}).items():
                setattr(fs, name, value)
            _filesystems[key] = fs
        return _filesystems[key]


def endpoint(loc) -> str:
    """The store's endpoint as configured (no user info), for messages."""
    if loc.scheme == "s3":
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(name):
                return f"{_strip_userinfo(os.environ[name])} ({name})"
        try:
            client = getattr(filesystem("s3"), "_s3", None)
            if client is not None:
                return _strip_userinfo(client.meta.endpoint_url)
        except Exception:  # noqa: BLE001 - only for a message
            pass
        return "AWS S3 (the region's endpoint)"
    return _strip_userinfo(os.environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com"))


def _strip_userinfo(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


def retry_budget() -> float:
    raw = os.environ.get("GRR_STORE_RETRY_S")
    try:
        return float(raw) if raw else DEFAULT_RETRY_S
    except ValueError:
        raise ValueError(f"GRR_STORE_RETRY_S={raw!r}: expected seconds, e.g. 120") from None


_FINAL_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EEXIST,
                 errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, getattr(errno, "EREMCHG", errno.ENOENT)}
_NETWORK_LIBRARIES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "gcsfs", "s3fs"}


def _is_final(err: BaseException) -> bool:
    """A failure that another try will not change (missing, denied, invalid)."""
    if "Credentials" in type(err).__name__ or isinstance(err, PermissionError | FileNotFoundError |
                                                         FileExistsError | IsADirectoryError | NotADirectoryError):
        return True
    return isinstance(err, OSError) and err.errno in _FINAL_ERRNOS


def _is_transient(err: BaseException) -> bool:
    if _is_final(err):
        return False
    library = type(err).__module__.partition(".")[0]
    return isinstance(err, OSError | ConnectionError | TimeoutError) or library in _NETWORK_LIBRARIES


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _final(loc, err: BaseException) -> BaseException:
    """What a final failure is raised as: FileNotFoundError and FileExistsError as they are, the
    rest a StoreError saying what to do."""
    if isinstance(err, FileNotFoundError | FileExistsError):
        return err
    if "Credentials" in type(err).__name__ or isinstance(err, PermissionError):
        return StoreError(f"{loc}: access denied by {endpoint(loc)} ({_first_line(err)}); check the credentials "
                          "(AWS_PROFILE, AWS_ACCESS_KEY_ID, ~/.aws/credentials; for gs://, "
                          "GOOGLE_APPLICATION_CREDENTIALS)")
    return StoreError(f"{loc}: {endpoint(loc)} refused the request ({_first_line(err)})")


class _Backoff:
    """Sleeps between tries of one call; `wait(err)` raises StoreUnavailable once the budget is spent."""

    _warned_at = 0.0

    def __init__(self, loc):
        self.loc, self.budget, self.tries, self.since = loc, retry_budget(), 0, None

    def wait(self, err: BaseException) -> None:
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        self.tries += 1
        left = self.budget - (now - self.since)
        if left <= 0:
            raise StoreUnavailable(
                f"{self.loc}: the store at {endpoint(self.loc)} did not answer for {self.budget:.0f} s "
                f"({self.tries} tries; last: {_first_line(err)}); check the endpoint and the network, or allow "
                "longer with GRR_STORE_RETRY_S") from err
        if now - _Backoff._warned_at > 30:  # one warning in 30 s, not one per request
            _Backoff._warned_at = now
            log.warning("%s: %s (%s); retrying for up to %.0f s", self.loc, endpoint(self.loc), _first_line(err),
                        self.budget)
        delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (self.tries - 1)) * random.uniform(0.75, 1.25)
        time.sleep(max(0.0, min(delay, left)))


def call(loc, fn: Callable[[], T]) -> T:
    """`fn()` with the retries above; a final failure raised as `_final` says."""
    backoff = _Backoff(loc)
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - sorted below; anything else is raised as it is
            if _is_final(err):
                raise _final(loc, err) from err
            if not _is_transient(err):
                raise
            backoff.wait(err)


def fetch(locs: list, starts: list, ends: list) -> list[bytes | FileNotFoundError]:
    """Objects or byte ranges of them, concurrently; transient failures retried (only the requests
    that failed); a range past the object's end reads as b"" (the caller sees it short)."""
    out: list = [None] * len(locs)
    pending = list(range(len(locs)))
    backoffs: dict[str, _Backoff] = {}
    while pending:
        by_scheme: dict[str, list[int]] = {}
        for i in pending:
            by_scheme.setdefault(locs[i].scheme, []).append(i)
        failed = []
        for scheme, items in by_scheme.items():
            try:
                results = filesystem(scheme).cat_ranges([locs[i].key for i in items], [starts[i] for i in items],
                                                 [ends[i] for i in items], on_error="return")
            except Exception as err:  # noqa: BLE001 - the whole call failed: each request is retried
                results = [err] * len(items)
            for i, result in zip(items, results, strict=True):
                if not isinstance(result, BaseException):
                    out[i] = result
                elif isinstance(result, FileNotFoundError):
                    out[i] = result
                elif isinstance(result, OSError) and result.errno == errno.EINVAL and starts[i] is not None:
                    out[i] = b""  # 416: the object is shorter than the range (replaced since indexed)
                elif _is_final(result):
                    raise _final(locs[i], result) from result
                elif _is_transient(result):
                    failed.append((i, result))
                else:
                    raise result
        if failed:
            # one budget per store, counted from the first failure: the batch waits for the slowest
            i, err = failed[0]
            backoffs.setdefault(locs[i].scheme, _Backoff(locs[i])).wait(err)
        pending = [i for i, _ in failed]
    return out
