"""Where a sharded set lives, behind one small API: a local folder, or a prefix in an object
store through fsspec (`s3://` with s3fs, S3-compatible stores included; `gs://` with gcsfs).

`location(value)` turns what a user gave into a `Path` or a `StorePath`. A URL is never taken for a
local folder (`Path("s3://b/x")` is `s3:/b/x`, a folder named `s3:`): a scheme this grr has no store
for (`http://`, `ftp://`, ...), and a URL that lost its `//` on the way, are refused in one line.
A `StorePath` has the name operations of a path (`/`, `name`, `suffix`, `with_suffix`, `parent`)
and no `__fspath__`, so no local file call can take it for a folder either.

The operations below take a `Path` or a `StorePath`; they are the only file calls the manifest,
the shard writer, `grr data check` and the loaders' source make on a set that may be in a store.
An object store has no rename, but a PUT is atomic (an object appears whole or not at all), so
"publish under the final name" is one upload; a file is replaced the same way.

Errors: FileNotFoundError for a missing file or object; `StoreError` (an OSError, so commands print
it as their other I/O errors) for a store that refuses (access denied, no credentials, no such
bucket); `StoreUnavailable` for one that did not answer within the retry budget. The store's
client (its filesystem per process, the endpoint, the retries below) is grr_data.infra.store_client.

Retries: a failure that may pass (connection refused or dropped, timeouts, 5xx, throttling's 503
SlowDown) is retried with exponential backoff (0.5 s doubling to 15 s, +-25% jitter) until
`GRR_STORE_RETRY_S` seconds (default 120) have passed since the call first failed; then
`StoreUnavailable` names the URL and the store's endpoint. Under throttling, calls get slower, not
failed, as long as some requests go through within the budget.

Credentials and endpoints come the usual way, found by the store's own library: for s3:// the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
AWS_DEFAULT_REGION), ~/.aws/credentials and ~/.aws/config, instance roles, and AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for an S3-compatible store such as MinIO; for gs:// Google's application default
credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud). Nothing here reads, logs or writes a key, and
a URL carrying credentials (`s3://key:secret@bucket`) is refused: URLs are recorded in run configs.

Node-local files: `node_cache(kind, url)` is the folder a command keeps for a URL on this machine
(`grr data shard`'s work folder): `$GRR_CACHE_DIR`, else `$XDG_CACHE_HOME/grr`, else `~/.cache/grr`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from grr_data.infra.files import publish, sha256_file, write_bytes_atomic
from grr_data.infra.store_client import StoreError, StoreUnavailable, call, endpoint, fetch, filesystem

__all__ = ["MAX_OPEN", "MERGE_GAP", "STORES", "Location", "RangeReader", "StoreError", "StorePath",
           "StoreUnavailable", "delete", "endpoint", "existing", "is_file", "is_remote", "is_url", "list_files",
           "local_copy", "local_folder", "location", "node_cache", "put_bytes", "put_file", "put_new", "read_bytes",
           "read_many", "read_text", "sha256", "size"]


# RFC 3986's scheme, then `://`; a Windows drive (`C:\`, `C:/x`) has no `//` after the colon
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# what a URL becomes once something has passed it through Path(): `s3:/bucket/set`
_MANGLED = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:$")
# scheme -> the fsspec implementation's package, and the extra that installs it
STORES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
# ranges of one object closer than this are fetched in one request: a sample's .jpg, .txt and .ids
# (~1.5 kB of tar headers and caption apart), and neighbouring samples of one batch; a whole sample
# (four 512-byte headers, padded members) is larger, so no sample's bytes are fetched for another
MERGE_GAP = 4 << 10
MAX_OPEN = 128  # local descriptors kept open per process (a set of thousands of shards stays under 1024)


class StorePath:
    """An object (or a prefix) in a store, by URL: `s3://bucket/key`. Only names: the operations
    of this module read and write it."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        scheme, _, rest = url.partition("://")
        self.url = f"{scheme.lower()}://{'/'.join(part for part in rest.split('/') if part)}"

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0]

    @property
    def key(self) -> str:
        """`bucket/key`, what fsspec calls the path."""
        return self.url.partition("://")[2]

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> StorePath:
        head = self.key.rpartition("/")[0]
        return StorePath(f"{self.scheme}://{head}") if head else self

    def __truediv__(self, part: str | os.PathLike) -> StorePath:
        return StorePath(f"{self.url}/{os.fspath(part)}")

    def with_name(self, name: str) -> StorePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> StorePath:
        return self.parent / (self.stem + suffix)

    def relative_to(self, other: StorePath) -> str:
        if not self.url.startswith(other.url + "/"):
            raise ValueError(f"{self} is not under {other}")
        return self.url[len(other.url) + 1 :]

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StorePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StorePath) and other.url == self.url

    def __lt__(self, other: StorePath) -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self):
        return StorePath, (self.url,)


Location = Path | StorePath


def is_url(value: str | os.PathLike | StorePath) -> bool:
    return isinstance(value, StorePath) or bool(_URL.match(os.fspath(value)))


def is_remote(loc: Location) -> bool:
    return isinstance(loc, StorePath)


def location(value: str | os.PathLike | StorePath, what: str = "a sharded set") -> Location:
    """`value` as a `StorePath` (a URL of a store this grr has) or a local `Path`; ValueError (one
    line, naming it) for a URL of another scheme, a URL with credentials in it, a store whose library
    is not installed, and a path that is a URL whose `//` was lost on the way (`s3:/bucket/x`)."""
    if isinstance(value, StorePath):
        return value
    text = os.fspath(value)
    if match := _URL.match(text):
        scheme = match.group(1).lower()
        if scheme not in STORES:
            raise ValueError(f"{text}: {what} at a {scheme}:// URL is not supported; give a local folder, an "
                             "s3:// URL (also S3-compatible stores, through AWS_ENDPOINT_URL) or a gs:// URL")
        bucket = text[match.end():].partition("/")[0]
        if "@" in bucket:
            raise ValueError(f"{scheme}://...@{bucket.rpartition('@')[2]}: credentials in a URL would be recorded "
                             "with it (run configs, logs); give them the usual way (environment, ~/.aws, AWS_PROFILE)")
        if not bucket:
            raise ValueError(f"{text}: no bucket in this URL; write {scheme}://BUCKET/PREFIX")
        package, extra = STORES[scheme]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"{text}: {scheme}:// needs the {package} package: pip install 'grr-coca[{extra}]'")
        return StorePath(text)
    first = Path(text).parts[0] if Path(text).parts else ""
    if _MANGLED.match(first):
        raise ValueError(f"{text}: looks like a URL whose '//' was lost ({first}/...); give a local folder "
                         "or the URL as it is")
    return Path(text)


def local_folder(value: str | os.PathLike, what: str) -> Path:
    """`value` as a local path; ValueError for any URL (a run folder, a shard run's input)."""
    if _URL.match(os.fspath(value)):
        raise ValueError(f"{os.fspath(value)}: {what} must be a local path, not a URL")
    return location(value, what)


# ---- operations ------------------------------------------------------------------------------


def is_file(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.is_file()
    try:
        return call(loc, lambda: filesystem(loc.scheme).info(loc.key))["type"] == "file"
    except FileNotFoundError:
        return False


def size(loc: Location) -> int | None:
    """The file's size in bytes; None when it does not exist."""
    if isinstance(loc, Path):
        return loc.stat().st_size if loc.is_file() else None
    try:
        info = call(loc, lambda: filesystem(loc.scheme).info(loc.key))
    except FileNotFoundError:
        return None
    return int(info["size"]) if info["type"] == "file" else None


def read_bytes(loc: Location) -> bytes:
    if isinstance(loc, Path):
        return loc.read_bytes()
    return call(loc, lambda: filesystem(loc.scheme).cat_file(loc.key))


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8") if isinstance(loc, StorePath) else loc.read_text()


def read_many(locs: Sequence[Location]) -> list[bytes | FileNotFoundError]:
    """Whole files, in order (a store: concurrent requests); a missing one is its FileNotFoundError."""
    remote = [loc for loc in locs if isinstance(loc, StorePath)]
    fetched = dict(zip(remote, fetch(remote, [None] * len(remote), [None] * len(remote)), strict=True))
    out = []
    for loc in locs:
        if isinstance(loc, StorePath):
            out.append(fetched[loc])
            continue
        try:
            out.append(loc.read_bytes())
        except FileNotFoundError as err:
            out.append(err)
    return out


class RangeReader:
    """Reads byte ranges of the shards of one set: `read([(loc, offset, size), ...])` gives, per
    request, its bytes (short when the file is) or the OSError that reading it raised.

    Local files: `os.pread` on descriptors kept open (at most MAX_OPEN a process); processes forked
    after reads share them safely, since pread never moves a shared file position. Objects in a
    store: one concurrent batch of ranged GETs, requests of one object less than MERGE_GAP apart
    merged into one; transient failures retried as this module's other calls are."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def read(self, requests: Sequence[tuple[Location, int, int]]) -> list[bytes | OSError]:
        out: list = [None] * len(requests)
        spans: list[tuple[StorePath, int, int, list[int]]] = []  # (object, start, end, request numbers)
        for i in sorted((i for i, r in enumerate(requests) if isinstance(r[0], StorePath)),
                        key=lambda i: (requests[i][0].url, requests[i][1])):
            loc, offset, length = requests[i]
            if spans and spans[-1][0] == loc and offset <= spans[-1][2] + MERGE_GAP:
                spans[-1] = (loc, spans[-1][1], max(spans[-1][2], offset + length), spans[-1][3] + [i])
            else:
                spans.append((loc, offset, offset + length, [i]))
        fetched = fetch([s[0] for s in spans], [s[1] for s in spans], [s[2] for s in spans]) if spans else []
        for (_, start, _, members), data in zip(spans, fetched, strict=True):
            for i in members:
                _, offset, length = requests[i]
                out[i] = data if isinstance(data, BaseException) else data[offset - start : offset - start + length]
        for i, (loc, offset, length) in enumerate(requests):
            if isinstance(loc, Path):
                try:
                    out[i] = os.pread(self._fd(loc), length, offset)
                except OSError as err:
                    out[i] = err
        return out

    def _fd(self, path: Path) -> int:
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= MAX_OPEN:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd  # most recently used last
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):
        return {"_fds": {}}  # descriptors do not travel to spawned processes; each opens its own


def put_file(local: Path, loc: Location) -> None:
    """Publish the finished local file `local` as `loc`, replacing what is there: a rename (files.publish)
    locally, an upload (then `local` is removed) to a store."""
    if isinstance(loc, Path):
        publish(local, loc)
        return
    call(loc, lambda: filesystem(loc.scheme).put_file(str(local), loc.key))
    local.unlink()


def put_bytes(loc: Location, data: bytes) -> None:
    """Write `loc` whole, atomically (files.write_bytes_atomic locally; one PUT to a store)."""
    if isinstance(loc, Path):
        write_bytes_atomic(loc, data)
        return
    call(loc, lambda: filesystem(loc.scheme).pipe_file(loc.key, data))


def put_new(loc: Location, data: bytes) -> None:
    """Create `loc` holding `data`; FileExistsError when it exists. A store: a conditional PUT
    (If-None-Match), so of two writers one wins; where the store ignores the condition, a check
    first (a race of a few milliseconds remains)."""
    if isinstance(loc, Path):
        fd = os.open(loc, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    fs = filesystem(loc.scheme)
    try:
        call(loc, lambda: fs.pipe_file(loc.key, data, mode="create"))
    except (NotImplementedError, TypeError):
        if is_file(loc):
            raise FileExistsError(f"{loc} exists") from None
        put_bytes(loc, data)


def delete(loc: Location) -> None:
    """Remove a file; nothing when it is not there."""
    if isinstance(loc, Path):
        loc.unlink(missing_ok=True)
        return
    try:
        call(loc, lambda: filesystem(loc.scheme).rm_file(loc.key))
    except FileNotFoundError:
        pass


def list_files(root: Location) -> dict[Location, int]:
    """Every file under `root` (recursively) and its size, sorted by name; {} when there is none."""
    if isinstance(root, Path):
        return {p: p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    found = call(root, lambda: filesystem(root.scheme).find(root.key, detail=True))
    files = {StorePath(f"{root.scheme}://{key}"): int(info.get("size") or 0) for key, info in found.items()
             if info.get("type") == "file"}
    return dict(sorted(files.items()))


def existing(locs: Sequence[Location]) -> set[Location]:
    """Which of `locs` are files: one check each locally, one listing per folder in a store."""
    found: set[Location] = {loc for loc in locs if isinstance(loc, Path) and loc.is_file()}
    remote = [loc for loc in locs if isinstance(loc, StorePath)]
    for parent in sorted({loc.parent for loc in remote}):
        found |= set(list_files(parent)) & set(remote)
    return found


def sha256(loc: Location, chunk: int = 8 << 20) -> str:
    """The hex SHA-256 of a file; an object is streamed (and hashed again from its start after a
    failure part way)."""
    if isinstance(loc, Path):
        return sha256_file(loc)

    def stream() -> str:
        digest = hashlib.sha256()
        with filesystem(loc.scheme).open(loc.key, "rb", block_size=chunk, cache_type="none") as f:
            while block := f.read(chunk):
                digest.update(block)
        return digest.hexdigest()

    return call(loc, stream)


@contextmanager
def local_copy(loc: Location, siblings: Sequence[Location] = ()) -> Iterator[Path]:
    """A local path holding `loc`'s bytes: `loc` itself when local; else a download into a temporary
    folder removed on exit, with those of `siblings` that exist beside it under their own names
    (a shard with its index and checksums). FileNotFoundError when `loc` is missing."""
    if isinstance(loc, Path):
        yield loc
        return
    with tempfile.TemporaryDirectory(prefix="grr-store-") as tmp:
        for item in (loc, *siblings):
            try:
                call(item, lambda item=item: filesystem(item.scheme).get_file(item.key, os.path.join(tmp, item.name)))
            except FileNotFoundError:
                if item is loc:
                    raise
        yield Path(tmp) / loc.name


def node_cache(kind: str, loc: StorePath) -> Path:
    """This machine's folder for `kind` work on `loc` (e.g. a shard run's work folder): the same for
    the same URL, so a rerun on this node finds it."""
    base = os.environ.get("GRR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "grr")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", loc.key)[-60:].strip("-")
    return Path(base) / kind / f"{hashlib.sha256(loc.url.encode()).hexdigest()[:16]}-{readable}"
