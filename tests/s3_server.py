"""A real S3-compatible server on localhost for the tests and the benchmark: moto in server mode
(`moto[server]`, a process of its own), reached through a small proxy that can delay every response,
answer 503 SlowDown (throttling), or go down (drop every request without an answer).

    with S3Server() as s3:              # starts moto and the proxy
        s3.environ()                    # {AWS_ENDPOINT_URL: the proxy, test credentials, region}
        s3.client.create_bucket(...)    # boto3, straight to moto (never through the faults)
        s3.proxy.delay_s = 0.2; s3.proxy.slowdown(5); s3.proxy.down(); s3.proxy.up()
"""

from __future__ import annotations

import http.client
import itertools
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# test credentials: moto accepts any; tests look for the secret in what runs write
ACCESS_KEY = "AKIAGRRTESTKEY0000000"
SECRET_KEY = "grr-test-secret-d41d8cd98f00b204e9800998ecf8427e"
REGION = "us-east-1"

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        proxy: Proxy = self.server.proxy
        body = self._body()
        proxy.requests += 1
        proxy.log.append((self.command, self.path.partition("?")[0], self.headers.get("Range")))
        if proxy.is_down:  # a dropped connection: no answer at all
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if proxy.take_slowdown():
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            self.wfile.write(_SLOWDOWN)
            return
        if proxy.delay_s:
            time.sleep(proxy.delay_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class Proxy:
    """Forwards HTTP to moto; `delay_s`, `slowdown(n)`, `down()` / `up()` are the faults."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.delay_s, self.requests, self.is_down = 0.0, 0, False
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header) of each request, in order
        self._slowdowns, self.throttled, self._lock, self._server = 0, 0, threading.Lock(), None
        self.up()

    def slowdown(self, n: int) -> None:
        """Answer the next `n` requests 503 SlowDown, as a throttling store does."""
        with self._lock:
            self._slowdowns = n

    def take_slowdown(self) -> bool:
        with self._lock:
            if self._slowdowns > 0:
                self._slowdowns -= 1
                self.throttled += 1
                return True
            return False

    def up(self) -> None:
        self.is_down = False
        if self._server is None:
            self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _Forward)
            self._server.daemon_threads = True
            self._server.proxy = self
            threading.Thread(target=self._server.serve_forever, daemon=True, name="s3-proxy").start()

    def down(self) -> None:
        """Drop every request from now on: the connection closes without an answer. (The listening
        socket stays open: loader workers forked from this process hold a copy of it, so closing it
        here would leave connections accepted by the kernel that nobody answers.)"""
        self.is_down = True

    def close(self) -> None:
        self.is_down = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class S3Server:
    def __init__(self):
        self.moto_port = free_port()
        self._moto = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p",
             str(self.moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.moto_port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self._moto.poll() is not None:
                    self.close()
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        self.proxy = Proxy(self.moto_port)
        import boto3

        self.client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}", region_name=REGION,
                                   aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def environ(self) -> dict[str, str]:
        """What a user of an S3-compatible store sets: the endpoint (the proxy) and credentials."""
        return {"AWS_ENDPOINT_URL": self.proxy.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        if getattr(self, "proxy", None) is not None:
            self.proxy.close()
        self._moto.terminate()
        self._moto.wait(timeout=30)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- helpers for the tests (the fixtures `s3` and `env` are in conftest.py) ------------------

_buckets = itertools.count()


def new_bucket(s3: S3Server) -> str:
    return s3.bucket(f"grr-test-{next(_buckets)}")


def upload(s3: S3Server, local: Path, url: str) -> str:
    """Copy a local set into the store, as a user's `aws s3 cp --recursive` would."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local)}")
    return url


def objects(s3: S3Server, url: str) -> dict[str, bytes]:
    """{name under the prefix: bytes} of every object under `url`."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    listed = s3.client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1 :]: s3.client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed}
