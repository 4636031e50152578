"""What the store guard's agreement costs a step (grr_train/train/store_guard.py): 2 gloo processes
on this machine call `StoreGuard.read` `--calls` times, against the same reads without the guard.

    .venv/bin/python benchmarks/store_guard.py --calls 2000 --repeats 3

The read is a no-op, so the figure is the agreement alone: one all_reduce of one int32 on a gloo
group over loopback, and its `.item()` (on the CPU: no wait on a GPU). The guard runs once per
optimizer step (and per validation batch) only with a set in a store and several processes; a step
of the real model takes hundreds of milliseconds. Prints one JSON line per repeat and the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _worker(rank: int, init_file: str, calls: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from grr_train.runtime.distributed import cpu_group
    from grr_train.train.store_guard import StoreGuard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(minutes=2))
    guard, bare = StoreGuard(cpu_group(2)), StoreGuard()
    rows = []
    for _ in range(repeats):
        for name, g in (("bare", bare), ("guarded", guard)):
            dist.barrier()
            start = time.perf_counter()
            for k in range(calls):
                g.read(lambda k=k: k)
            rows.append({"what": name, "us_per_call": (time.perf_counter() - start) / calls * 1e6})
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/rows.json"
        mp.spawn(_worker, args=(f"{tmp}/init", args.calls, args.repeats, out), nprocs=2)
        rows = json.loads(Path(out).read_text())
    for row in rows:
        print(json.dumps(row))
    guarded = statistics.median(r["us_per_call"] for r in rows if r["what"] == "guarded")
    bare = statistics.median(r["us_per_call"] for r in rows if r["what"] == "bare")
    print(json.dumps({"median_us_per_step_guarded": round(guarded, 1), "median_us_per_step_bare": round(bare, 2),
                      "calls": args.calls, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
