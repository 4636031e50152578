"""An exclusive lock on a folder for the whole of a run that writes into it (`grr data shard`'s
--out; a training run folder), so that two runs never interleave their files.

`with hold_lock(folder, what="grr data shard"):` creates `folder/.grr.lock`, takes an exclusive
`flock` on it and writes who holds it (PID, host, start time, command) into it. The kernel drops
a flock when its holder dies however it dies, so:

- held now: a second run fails at once with `LockedError` naming the holder's PID, host and age;
- a file left by a process that died (kill -9, power loss) on this host: its PID is gone, the
  flock is free: taken over with a warning;
- a file left by a process on another host, with the flock free: this host cannot tell whether
  that run is dead (flock does not reach across hosts on every shared filesystem), so it is
  reported with its host and age, and `break_lock=True` takes it over.

On release (any exit that runs Python's cleanup) the file is removed. Forked children (loader
workers, pools) drop their inherited descriptor, so a lingering child never holds the lock.
Where the filesystem has no flock (ENOLCK, EOPNOTSUPP: some network and FUSE filesystems) the
file's exclusive creation is the lock, and the same rules decide about a file found there.

A folder in an object store (`grr data shard --out s3://...`) has no flock: `hold_store_lock` makes
the object `URL/.grr.lock`, with the same record, by a conditional PUT (If-None-Match: of two runs
one creates it, the other is refused naming it), and deletes it on release. A store cannot say
whether the holder still runs, so an object found there is decided by the rules above for a file
without a flock: a holder on this host whose PID is gone is taken over, one on another host is
refused unless `break_lock`. The caller also holds a local lock (the run's work folder on this
node), so two runs on one host fail at once. The limit: a run killed on another host leaves the
object behind until someone passes --break-lock; a store that ignores the condition (an older
S3-compatible store) leaves a race of a few milliseconds between two runs started together.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from grr_data.infra import store
from grr_data.infra.store import StorePath

log = logging.getLogger(__name__)
LOCK_NAME = ".grr.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_held: dict[int, Path] = {}  # descriptor -> lock file, held by this process


class LockedError(RuntimeError):
    """Another run holds (or may hold) the folder; the message names it and says what to do."""


def _drop_inherited() -> None:
    # Closing a forked copy does not release the parent's flock; it only stops the child keeping
    # the lock alive after the parent dies.
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited)


def _age(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Holder:
    def __init__(self, data: dict):
        self.pid = int(data.get("pid", -1))
        self.host = str(data.get("host", "?"))
        self.started = float(data.get("started", 0))
        self.what = str(data.get("what", "a grr run"))

    @classmethod
    def read(cls, fd: int) -> _Holder | None:
        raw = os.pread(fd, 1 << 16, 0)
        try:
            return cls(json.loads(raw)) if raw.strip() else None
        except (ValueError, TypeError):
            return None

    def __str__(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.what} (PID {self.pid} on host {self.host}, since {when}, {_age(time.time() - self.started)} ago)"


def _refuse_or_take(path: Path, holder: _Holder | None, break_lock: bool) -> None:
    """The flock is free but the file names a holder: decide whether to take it over."""
    if holder is None:
        return  # an empty or garbled file: its writer died before saying who it was
    if holder.host == socket.gethostname():
        # the holder no longer holds it: it died (its PID may since belong to another process,
        # even to this one: a restarted container numbers its processes the same way)
        log.warning("%s: taking over the lock left by %s, which has ended", path.parent, holder)
    elif break_lock:
        log.warning("%s: breaking the lock of %s, as asked", path.parent, holder)
    else:
        raise LockedError(f"{path.parent} is locked by {holder}; this host cannot tell whether that run still "
                          f"runs. If it is dead, rerun with --break-lock (or delete {path})")


def _take_flock(path: Path, break_lock: bool) -> int | None:
    """The locked descriptor, or None when this filesystem has no flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _Holder.read(fd)
            os.close(fd)
            who = str(holder) if holder else "another process (which has not yet written who it is)"
            raise LockedError(f"{path.parent} is in use by {who}; wait for it to finish or use another folder")\
                from None
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_FLOCK:
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file as we opened it: lock the new one
    try:
        _refuse_or_take(path, _Holder.read(fd), break_lock)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_exclusive(path: Path, break_lock: bool) -> int:
    """Without flock: whoever creates the file holds the lock."""
    if path.resolve() in _held.values():
        raise LockedError(f"{path.parent} is in use by this process (PID {os.getpid()}) already")
    for _ in range(3):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        holder = _Holder.read(fd)
        os.close(fd)
        if (holder is not None and holder.host == socket.gethostname() and holder.pid != os.getpid()
                and _alive(holder.pid)):
            raise LockedError(f"{path.parent} is in use by {holder}; wait for it to finish or use another folder")
        _refuse_or_take(path, holder, break_lock)
        path.unlink(missing_ok=True)
    raise LockedError(f"{path.parent}: could not create {path.name}; another run keeps taking it")


@contextmanager
def hold_lock(folder: str | os.PathLike, what: str = "a grr run", break_lock: bool = False):
    """Hold `folder`'s lock for the body of the `with` (the folder is created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _take_flock(path, break_lock)
    if fd is None:
        fd = _create_exclusive(path, break_lock)
    _held[fd] = path.resolve()
    try:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": what,
              "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        yield path
    finally:
        # removed while still locked, so no one can lock the old file after we let go
        try:
            path.unlink(missing_ok=True)
        finally:
            _held.pop(fd, None)
            os.close(fd)


@contextmanager
def hold_store_lock(folder: StorePath, what: str = "a grr run", break_lock: bool = False):
    """Hold the lock object of a folder in a store for the body of the `with` (see the module)."""
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": what,
          "argv": sys.argv}
    for _ in range(3):
        try:
            store.put_new(path, (json.dumps(me) + "\n").encode())
            break
        except FileExistsError:
            pass
        try:
            raw = store.read_bytes(path)
        except FileNotFoundError:
            continue  # released as we looked: try again
        try:
            holder = _Holder(json.loads(raw))
        except (ValueError, TypeError):
            holder = None
        if holder is not None and holder.host == socket.gethostname() and holder.pid != os.getpid() \
                and _alive(holder.pid):
            raise LockedError(f"{folder} is in use by {holder}; wait for it to finish or use another --out")
        _refuse_or_take(path, holder, break_lock)
        store.delete(path)
    else:
        raise LockedError(f"{folder}: could not create {LOCK_NAME}; another run keeps taking it")
    try:
        yield path
    finally:
        store.delete(path)
