"""Where the trainer's step spends its time: torch.profiler over the step `grr bench train` times.

    python benchmarks/profile_step.py --preset grr-coca --batch-size 192 --compile blocks --steps 5

Builds the step with `grr_train/train/bench.py` (the trainer's TrainStep: same losses, clipping, fused
AdamW, precision and compile settings, synthetic inputs already on the device), runs the warm-up
(compilation happens there), times `--steps` steps without the profiler, then profiles as many.
Prints:
- ms per step unprofiled, and wall per step under the profiler;
- GPU busy: the union of kernel intervals over the profiled wall (the profiler slows the host, so
  this is a floor), and kernel time per step over the unprofiled step (1.0 = the GPU never idles,
  assuming one stream);
- the top kernels by total GPU time with their share and calls per step;
- time by category (gemm/matmul, flash/attention, elementwise/fused triton, norm, optimizer,
  copies/casts, nccl, other), from the kernel names;
- the copies: every copy/cast kernel (and device memcpy/memset) by the operator that launched it,
  its callers and its input shapes, so each copy can be traced to the code that makes it.
`--set KEY=VALUE` takes the training settings `grr bench train --set` takes (the speed switches,
dropout, ...), to profile a step with a lever on or off.
Writes a chrome trace of one more step (gzipped) to --out (default $OUT, else the working folder).
Without CUDA it profiles CPU operators instead (self CPU time, categories from the operator
names), so it runs on a CPU with grr-tiny.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grr_train.train.bench import make_bench_step, run_steps  # noqa: E402
from grr_train.train.settings import parse_set  # noqa: E402

# First match wins: the order matters (clipping's foreach norm is optimizer work, not a layer norm).
CATEGORIES = [
    ("nccl", r"nccl"),
    ("flash/attention", r"flash|fmha|attention|sdpa|mha"),
    ("gemm/matmul", r"gemm|matmul|cutlass|xmma|nvjet|wgmma|cublas|^aten::(mm|addmm|bmm|linear|baddbmm)$"),
    ("optimizer", r"adam|lpnorm|_foreach_norm|clip_grad"),
    ("norm", r"rms_?norm|layer_?norm|rsqrt"),
    ("copies/casts", r"memcpy|memset|copy|cast|convert|^aten::(to|contiguous|clone)$"),
    ("elementwise/fused triton", r"elementwise|vectorized|reduce_kernel|unrolled|foreach|multi_tensor|softmax"
                                 r"|^aten::(add|sub|mul|div|neg|exp|log|pow|sqrt|tanh|gelu|silu|sigmoid|where"
                                 r"|masked_fill|fill_|zero_|sum|mean|cat|stack|index|embedding)"),
]
# Inductor names a fused kernel after every op it fused (autocast's _to_copy in most of them), so a
# triton kernel is a template GEMM, a fused norm, or elementwise; not a copy.
TRITON = [("gemm/matmul", r"^triton_tem"), ("norm", r"rsqrt|norm"), ("flash/attention", r"flex_attention")]
MAX_TRACE_BYTES = 15 * 2**20  # what one file brought back from the GPU machine may weigh


def category(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):
        return next((label for label, pattern in TRITON if re.search(pattern, low)), "elementwise/fused triton")
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _where(event, depth: int = 4) -> str:
    """An operator and its callers, innermost first: 'aten::copy_ < aten::_to_copy < aten::to < ...'."""
    names = []
    while event is not None and len(names) < depth:
        names.append(event.name if len(event.name) <= 60 else event.name[:57] + "...")
        event = event.cpu_parent
    return " < ".join(names)


def copy_sites(prof, cuda: bool) -> dict:
    """{(operator chain, input shapes): [us, calls]} of the copy/cast work: on a GPU the copy kernels
    (and memcpy/memset) attributed to the CPU operator that launched them; on a CPU the copy
    operators' own CPU time."""
    sites = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        shapes = str([list(s) for s in e.input_shapes if s])[:70] if e.input_shapes else ""
        if cuda:
            for kernel in e.kernels:
                if category(kernel.name) == "copies/casts":
                    site = sites[(f"[{kernel.name[:50]}] {_where(e)}", shapes)]
                    site[0] += kernel.duration
                    site[1] += 1
        elif category(e.name) == "copies/casts" and e.self_cpu_time_total > 0:
            site = sites[(_where(e), shapes)]
            site[0] += e.self_cpu_time_total
            site[1] += 1
    return sites


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="grr-coca")
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--compile", default="auto", help="off, blocks, model or auto (blocks on CUDA)")
    ap.add_argument("--inductor-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--defer", action="store_true", help="launch step N+1 before reading step N's metrics")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the chrome trace")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--copies", type=int, default=15, help="copy/cast sites to list")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a training setting, as grr bench train --set takes it")
    args = ap.parse_args()

    started = time.perf_counter()
    step, about = make_bench_step(args.preset, args.batch_size, args.accumulation, args.device, args.precision,
                                  args.compile, inductor_mode=args.inductor_mode, settings=parse_set(args.sets))
    dev = about.pop("_device")
    cuda = dev.type == "cuda"
    run_steps(step, args.warmup, defer=False, desc="warm-up")
    sync(dev)
    setup_s = time.perf_counter() - started
    t0 = time.perf_counter()
    run_steps(step, args.steps, args.defer)
    sync(dev)
    step_ms = (time.perf_counter() - t0) / args.steps * 1000

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        run_steps(step, args.steps, args.defer)
        sync(dev)
        wall_us = (time.perf_counter() - t0) * 1e6

    n = args.steps
    samples = args.batch_size * args.accumulation
    print(f"{args.preset} on {about['device']} ({about['precision']}, compile {about['compile']}"
          f"{' ' + args.inductor_mode if args.inductor_mode else ''}, micro-batch {args.batch_size} x "
          f"{args.accumulation}, {'deferred read-back' if args.defer else 'read-back per step'}); "
          f"set-up and warm-up {setup_s:.0f} s")
    print(f"ms per step: {step_ms:.1f} unprofiled ({samples / step_ms * 1000:.1f} samples/s), "
          f"{wall_us / n / 1000:.1f} under the profiler")

    if cuda:  # kernels (and device copies/sets): the rows that ran on the GPU
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = union_us([(e.time_range.start, e.time_range.end) for e in kernels])
        per_name = defaultdict(lambda: [0.0, 0])
        for e in kernels:
            per_name[e.name][0] += e.time_range.elapsed_us()
            per_name[e.name][1] += 1
        total = sum(t for t, _ in per_name.values())
        print(f"GPU busy: {busy / wall_us:.1%} of the profiled wall (kernel-interval union); kernel time "
              f"{total / n / 1000:.1f} ms per step = {total / n / 1000 / step_ms:.1%} of the unprofiled step")
        unit = "GPU"
    else:  # operators' own CPU time (children excluded), top-level and nested alike
        per_name = defaultdict(lambda: [0.0, 0])
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                per_name[e.key] = [e.self_cpu_time_total, e.count]
        total = sum(t for t, _ in per_name.values())
        print(f"CPU (no CUDA): operator self time {total / n / 1000:.1f} ms per step = "
              f"{total / wall_us:.1%} of the profiled wall (above 100% with several threads)")
        unit = "CPU"

    print(f"\ntop {args.top} by total {unit} time ({n} steps; share of all {unit} time, calls per step):")
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    for name, (t, calls) in rows[: args.top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"  {t / n / 1000:9.2f} ms {t / total:6.1%} {calls / n:7.1f}  [{category(name)}] {short}")

    by_cat = defaultdict(float)
    for name, (t, _) in per_name.items():
        by_cat[category(name)] += t
    print(f"\n{unit} time by category (ms per step, share):")
    for label, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {label:26s} {t / n / 1000:9.2f} ms {t / total:6.1%}")

    copies = copy_sites(prof, cuda)
    copy_total = sum(t for t, _ in copies.values())
    print(f"\ncopies/casts by where they are launched ({copy_total / n / 1000:.2f} ms per step; launching operator "
          "< its callers, input shapes; ms per step, calls per step):")
    for (chain, shapes), (t, calls) in sorted(copies.items(), key=lambda kv: -kv[1][0])[: args.copies]:
        print(f"  {t / n / 1000:9.3f} ms {calls / n:7.1f}  {chain}  {shapes}")

    if not args.no_trace:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        raw = out / f"trace-{args.preset}-b{args.batch_size}.json"
        with profile(activities=activities) as one:
            run_steps(step, 1, args.defer)
            sync(dev)
        one.export_chrome_trace(str(raw))
        packed = raw.with_suffix(".json.gz")
        with open(raw, "rb") as src, gzip.open(packed, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        size = packed.stat().st_size
        if size > MAX_TRACE_BYTES:
            packed.unlink()
            print(f"\nchrome trace of one step: {size / 2**20:.1f} MiB gzipped, over {MAX_TRACE_BYTES / 2**20:.0f} "
                  "MiB: not kept")
        else:
            print(f"\nchrome trace of one step: {packed} ({size / 2**20:.1f} MiB; open in https://ui.perfetto.dev)")


if __name__ == "__main__":
    main()
