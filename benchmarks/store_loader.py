"""The loaders' samples/s from a set in an S3-compatible store against the same set on disk.

    .venv/bin/python benchmarks/store_loader.py --samples 512 --batches 24 --workers 2
    .venv/bin/python benchmarks/store_loader.py --server static --latency-ms 20

Makes a set of photo crops (tests/shardset.py: shorter side 288, ~40 kB JPEGs), starts moto's S3
server on localhost (tests/s3_server.py: its own process, reached directly, no fault proxy),
uploads the set, and reads it with `grr bench loader`'s function (grr_data.loader.bench) from disk
and from `s3://`, alternating, `--repeats` times each: CPU loader, and DALI's CPU path when DALI
imports. Prints one JSON line per run and the median ratio store/disk per loader. Also measures the
server itself: sequential and 64-way concurrent ranged GETs of one sample's size, which bound what
any reader gets from it.

What it measures is loopback to a Python server sharing the machine's cores with the loader (moto
answers a few tens of GETs a second on a busy 2-core machine): a floor for a real store on the
same network, where each GET costs network latency but no CPU here. `--server static` serves the
same objects from a thin read-only S3 endpoint (StaticS3: HEAD, ranged GET, ListObjectsV2), with
`--latency-ms` slept before each answer, to show the loader's own cost with a store that keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


class StaticS3:
    """A read-only S3 endpoint over a local folder (`ROOT/BUCKET/KEY`): HEAD and ranged GET of an
    object, ListObjectsV2; `latency_s` is slept before each answer (a store's first-byte latency).
    It costs little CPU, so the loader's own overhead shows, which moto's hides."""

    def __init__(self, root: Path, latency_s: float = 0.0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, unquote, urlsplit
        from xml.sax.saxutils import escape

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                headers = dict(headers or {})
                length = headers.pop("Content-Length", len(body))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _object(self, head: bool) -> None:
                time.sleep(latency_s)
                url = urlsplit(self.path)
                bucket, _, key = unquote(url.path).lstrip("/").partition("/")
                query = parse_qs(url.query)
                if not key and "list-type" in query:
                    prefix = query.get("prefix", [""])[0]
                    base = root / bucket
                    items = sorted(p for p in base.rglob("*") if p.is_file()
                                   and str(p.relative_to(base)).startswith(prefix))
                    contents = "".join(
                        f"<Contents><Key>{escape(str(p.relative_to(base)))}</Key><Size>{p.stat().st_size}</Size>"
                        "<LastModified>2026-12-06T00:00:00.000Z</LastModified><ETag>\"0\"</ETag>"
                        "<StorageClass>STANDARD</StorageClass></Contents>" for p in items)
                    body = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>' + bucket +
                            f"</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(items)}</KeyCount>"
                            f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}"
                            "</ListBucketResult>").encode()
                    return self._reply(200, body, {"Content-Type": "application/xml"})
                path = root / bucket / key
                if not key or not path.is_file():
                    body = b"<Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>"
                    return self._reply(404, b"" if head else body, {"Content-Type": "application/xml"}, head)
                size = path.stat().st_size
                headers = {"ETag": '"0"', "Last-Modified": "Sun, 06 Dec 2026 00:00:00 GMT",
                           "Accept-Ranges": "bytes", "Content-Type": "binary/octet-stream"}
                rng = self.headers.get("Range")
                if head:
                    return self._reply(200, b"", {**headers, "Content-Length": size}, head=True)
                if rng:
                    first, _, last = rng.removeprefix("bytes=").partition("-")
                    first, last = int(first), min(int(last) if last else size - 1, size - 1)
                    with open(path, "rb") as f:
                        f.seek(first)
                        data = f.read(last - first + 1)
                    headers["Content-Range"] = f"bytes {first}-{last}/{size}"
                    return self._reply(206, data, headers)
                return self._reply(200, path.read_bytes(), headers)

            def do_GET(self):
                self._object(head=False)

            def do_HEAD(self):
                self._object(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def server_gets(client, bucket: str, key: str, size: int, n: int) -> dict:
    """GETs/s of moto: `n` sequential ranged GETs, then `n` in 64 threads."""
    from concurrent.futures import ThreadPoolExecutor

    def get(i: int) -> None:
        start = (i * 4099) % 100_000
        client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + size - 1}")["Body"].read()

    t0 = time.perf_counter()
    for i in range(n):
        get(i)
    sequential = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(get, range(n)))
    return {"sequential_gets_per_s": sequential, "concurrent64_gets_per_s": n / (time.perf_counter() - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-dali", action="store_true")
    parser.add_argument("--server", choices=("moto", "static"), default="moto",
                        help="moto's S3 server, or a read-only static one over a local copy (StaticS3)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="static server: sleep before each answer")
    args = parser.parse_args()

    from s3_server import S3Server
    from shardset import make_shardset

    from grr_data.loader.bench import bench_loader
    from grr_data.loader.dali import dali_available

    sizes = [args.shard_size] * (args.samples // args.shard_size) + (
        [args.samples % args.shard_size] if args.samples % args.shard_size else [])
    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3:
        local = make_shardset(Path(tmp) / "set", tuple(sizes))
        # straight to moto, not through the tests' fault proxy
        os.environ.update({**s3.environ(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.moto_port}"})
        bucket = s3.bucket("grr-bench")
        for path in sorted(local.rglob("*")):
            if path.is_file():
                s3.client.upload_file(str(path), bucket, f"set/{path.relative_to(local)}")
        static = None
        if args.server == "static":
            import shutil

            shutil.copytree(local, Path(tmp) / "static" / bucket / "set")
            static = StaticS3(Path(tmp) / "static", args.latency_ms / 1000)
            os.environ["AWS_ENDPOINT_URL"] = static.url
        url = f"s3://{bucket}/set"
        mean_jpg = sum(p.stat().st_size for p in local.glob("train/*.tar")) // args.samples
        import boto3

        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
        print(json.dumps({"server": args.server, "latency_ms": args.latency_ms,
                          **server_gets(client, bucket, "set/train/shard-000000.tar", mean_jpg, 128),
                          "bytes_per_sample": mean_jpg}), flush=True)
        kinds = ["cpu"] + ([] if args.no_dali or not dali_available() else ["dali"])
        ratios = {}
        for kind in kinds:
            rates = {"disk": [], "store": []}
            for _ in range(args.repeats):
                for where, data in (("disk", local), ("store", url)):
                    options = {"draft": True} if kind == "cpu" else {}
                    r = bench_loader(data, kind, args.batch_size, args.workers, args.batches, device="cpu", **options)
                    rates[where].append(r["images_per_s"])
                    print(json.dumps({"loader": kind, "where": where, "images_per_s": round(r["images_per_s"], 1),
                                      "startup_s": round(r["startup_s"], 2), "cores": round(r["cores"], 2),
                                      "skipped": r["skipped"]}), flush=True)
            ratios[kind] = statistics.median(rates["store"]) / statistics.median(rates["disk"])
        print(json.dumps({"median_ratio_store_over_disk": {k: round(v, 3) for k, v in ratios.items()},
                          "server": args.server, "latency_ms": args.latency_ms, "batch_size": args.batch_size,
                          "workers": args.workers, "samples": args.samples, "cpus": os.cpu_count(),
                          "load_average": os.getloadavg()[0]}))
        if static is not None:
            static.close()


if __name__ == "__main__":
    main()
