"""The loaders' samples/s from a set in an S3-compatible store against the same set on disk.

    .venv/bin/python benchmarks/store_loader.py --samples 512 --batches 24 --workers 2

Makes a set of photo crops (tests/shardset.py: shorter side 288, ~40 kB JPEGs), starts moto's S3
server on localhost (tests/s3_server.py: its own process, reached directly, no fault proxy),
uploads the set, and reads it with `grr bench loader`'s function (grr_data.loader.bench) from disk
and from `s3://`, alternating, `--repeats` times each: CPU loader, and DALI's CPU path when DALI
imports. Prints one JSON line per run and the median ratio store/disk per loader. Also measures the
server itself: sequential and 64-way concurrent ranged GETs of one sample's size, which bound what
any reader gets from it.

What it measures is loopback to a Python server sharing the machine's cores with the loader (moto
answers a few tens of GETs a second on a busy 2-core machine): a floor for a real store on the
same network, where each GET costs network latency but no CPU here.
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
        url = f"s3://{bucket}/set"
        mean_jpg = sum(p.stat().st_size for p in local.glob("train/*.tar")) // args.samples
        print(json.dumps({"server": server_gets(s3.client, bucket, "set/train/shard-000000.tar", mean_jpg, 128),
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
                          "batch_size": args.batch_size, "workers": args.workers, "samples": args.samples,
                          "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
