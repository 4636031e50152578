"""Where `grr data shard` spends CPU, and how its memory grows: main process against workers.

    .venv/bin/python benchmarks/shard_scaling.py --tars 4 12 --per-tar 250 --workers 1 2

Makes img2dataset-like inputs (photo crops: 9 in 10 JPEGs already at the stored size, 1 in 10
larger, to be re-encoded; random captions) of each size in `--tars`, shards each with each worker
count in a fresh process, and prints one JSON line per run plus a summary: wall seconds and
samples/s; CPU seconds of the main process (getrusage SELF) and of the workers (CHILDREN, once
reaped); per sample, CPU ms of each and the main's share of a worker's; the main process's RSS
at the start and the highest seen after each shard (/proc/self/statm), and peak RSS (getrusage)
of the main process and of the largest worker. The marginal figures (the
difference between the two input sizes) leave out fixed costs (tokenizer load, start-up).
From the shares it estimates samples/s on 32 and 64 cores (compute only: no disk or network
limit), as min(cores / (worker + main CPU per sample), 1 / main CPU per sample).

`--code DIR` runs another checkout of grr (e.g. a `git worktree` of an older commit), to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = "red blue dog cat man woman tree car beach street sitting near a the on old small".split()

CHILD = """
import json, os, resource, sys, time
from grr_data.shard.run import shard_dataset
from grr_data.tokenizer import load_tokenizer
load_tokenizer(None)  # loaded (and cached) before the clock starts: a fixed cost, not a per-sample one
inp, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
def rss_mb():  # resident now (ru_maxrss is a high-water mark, mostly set by the imports)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before_rss, during = rss_mb(), []
main0, kids0, t0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
manifest, _ = shard_dataset(inp, out, split="95/5", shard_size=int(sys.argv[4]), workers=workers, progress=False,
                            on_shard=lambda path: during.append(rss_mb()))
wall = time.perf_counter() - t0
print(json.dumps({"workers": workers, "wall_s": wall,
                  "num_samples": sum(s["num_samples"] for s in manifest["splits"].values()),
                  "main_cpu_s": cpu(resource.RUSAGE_SELF) - main0, "worker_cpu_s": cpu(resource.RUSAGE_CHILDREN) - kids0,
                  "main_rss_before_mb": before_rss, "main_rss_max_mb": max(during + [rss_mb()]),
                  "main_rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def make_input(root: Path, num_tars: int, per_tar: int) -> Path:
    """img2dataset-like tars of photo crops (cached in `root`)."""
    import io

    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from shardset import _photos, photo_jpeg

    folder = root / f"in-{num_tars}x{per_tar}"
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = _photos()
    for t in range(num_tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                jpg = photo_jpeg(rng, photos, short=512 if i % 10 == 9 else 288)
                meta = {"key": key, "status": "success", "url": f"http://example.org/{key}.jpg"}
                text = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 16))))
                for ext, data in (("jpg", jpg), ("txt", text.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{t:05d}_stats.json").write_text(json.dumps({"successes": per_tar}))
    (folder / "done").write_text("")
    return folder


def run(code: Path, inp: Path, workers: int, shard_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(inp), f"{tmp}/out", str(workers), str(shard_size)],
                              cwd=code, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"shard run failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, nargs="+", default=[4, 12], help="input sizes, in tars")
    parser.add_argument("--per-tar", type=int, default=250)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "grr-shard-bench")
    parser.add_argument("--code", type=Path, default=REPO, help="the grr checkout to run")
    args = parser.parse_args()

    results = []
    for num_tars in args.tars:
        inp = make_input(args.work, num_tars, args.per_tar)
        for workers in args.workers:
            r = run(args.code, inp, workers, args.shard_size)
            r["tars"] = num_tars
            r["samples_per_s"] = r["num_samples"] / r["wall_s"]
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
            results.append(r)

    pooled = [r for r in results if r["workers"] > 1]
    if len(args.tars) < 2 or not pooled:
        return
    for workers in sorted({r["workers"] for r in pooled}):
        runs = sorted((r for r in pooled if r["workers"] == workers), key=lambda r: r["num_samples"])
        small, big = runs[0], runs[-1]
        n = big["num_samples"] - small["num_samples"]
        main_ms = 1000 * (big["main_cpu_s"] - small["main_cpu_s"]) / n
        worker_ms = 1000 * (big["worker_cpu_s"] - small["worker_cpu_s"]) / n
        print(f"{workers} workers, marginal per sample ({small['num_samples']} -> {big['num_samples']} samples): "
              f"main {main_ms:.4f} CPU ms, workers {worker_ms:.3f} CPU ms, main/worker {100 * main_ms / worker_ms:.1f}%; "
              f"whole big run: main {1000 * big['main_cpu_s'] / big['num_samples']:.4f} ms, workers "
              f"{1000 * big['worker_cpu_s'] / big['num_samples']:.3f} ms per sample")
        print(f"  main RSS at the start -> highest seen after a shard: {small['main_rss_before_mb']:.1f} -> "
              f"{small['main_rss_max_mb']:.1f} MB ({small['num_samples']} samples), {big['main_rss_before_mb']:.1f} -> "
              f"{big['main_rss_max_mb']:.1f} MB ({big['num_samples']}); peak RSS (getrusage) main "
              f"{small['main_rss_peak_mb']:.0f} / {big['main_rss_peak_mb']:.0f} MB, largest worker "
              f"{small['worker_rss_peak_mb']:.0f} / {big['worker_rss_peak_mb']:.0f} MB")
        for cores in (32, 64):
            estimate = min(cores / (worker_ms + main_ms), 1 / main_ms) * 1000
            print(f"  estimate on {cores} cores: {estimate:,.0f} samples/s (compute only)")


if __name__ == "__main__":
    main()
