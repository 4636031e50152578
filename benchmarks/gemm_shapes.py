"""The GEMM shapes of aligned widths (issue 19, lever 2), timed alone: GEGLU's hidden width as the
paper has it (2073) against padded ones (2080, ...), and the LM head's vocabulary (32,102 against
32,128), forward and both backward products, at grr-coca's shapes for a micro-batch.

    python benchmarks/gemm_shapes.py --batch-size 192            # on a GPU, bf16
    python benchmarks/gemm_shapes.py --batch-size 1 --reps 2     # a dry run on a CPU

Per width it prints each product's ms and TFLOP/s, and the sum over one training step (12 ViT
blocks, the LM head once), so the saving of a padded width reads as ms per step. Also times
GEGLU's elementwise part, GELU(gate) * value with the value half starting at offset `hidden` of
the merged projection's output (unaligned at 2073), forward and backward.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from kernel_timer import ms_per_call


def time_gemms(name: str, m: int, k: int, n: int, calls: int, dtype, dev, run) -> float:
    """Times a (K -> N) linear layer's three GEMMs over M rows, in the layouts autograd uses
    (y = x W^T, grad x = dy W, grad W = dy^T x); returns ms per step for `calls` layers."""
    x = torch.randn(m, k, dtype=dtype, device=dev)
    w = torch.randn(n, k, dtype=dtype, device=dev)
    dy = torch.randn(m, n, dtype=dtype, device=dev)
    total = 0.0
    for kind, fn in (("forward", lambda: x @ w.t()), ("grad input", lambda: dy @ w), ("grad weight", lambda: dy.t() @ x)):
        ms = run(fn)
        total += ms
        print(f"  {name:28s} {kind:11s} M {m:6d} K {k:5d} N {n:5d}: {ms:8.3f} ms {2 * m * k * n / ms / 1e9:8.1f} TFLOP/s")
    print(f"  {name:28s} per step ({calls} layer{'s' if calls > 1 else ''}, forward and backward): {total * calls:.2f} ms")
    return total * calls


def time_geglu_elementwise(rows: int, hidden: int, dtype, dev, run, calls: int) -> float:
    """GELU(gate) * value on the merged projection's output (rows, 2 * hidden), forward and backward."""
    both = torch.randn(rows, 2 * hidden, dtype=dtype, device=dev, requires_grad=True)
    grad = torch.randn(rows, hidden, dtype=dtype, device=dev)

    def fwd_bwd():
        gate, value = both.chunk(2, dim=-1)
        (F.gelu(gate) * value).backward(grad)
        both.grad = None

    ms = run(fwd_bwd)
    print(f"  GEGLU elementwise (value half at offset {hidden}): {ms:.3f} ms, per step ({calls} blocks) "
          f"{ms * calls:.2f} ms")
    return ms * calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--hidden", default="2073,2080,2112", help="GEGLU hidden widths to time (comma-separated)")
    ap.add_argument("--vocab", default="32102,32128")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12, help="ViT blocks (GEGLU layers per step)")
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--text", type=int, default=64, help="caption positions (LM head rows per sample)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    run = partial(ms_per_call, dev=dev, reps=args.reps)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"GEMM shapes on {name} ({str(dtype).replace('torch.', '')}), micro-batch {args.batch_size}")
    rows, d = args.batch_size * args.patches, args.width
    per_width = {}
    for hidden in (int(h) for h in args.hidden.split(",")):
        print(f"GEGLU hidden {hidden}:")
        per_width[hidden] = (time_gemms(f"W,V (merged) {d}->{2 * hidden}", rows, d, 2 * hidden, args.depth, dtype, dev, run)
                             + time_gemms(f"O {hidden}->{d}", rows, hidden, d, args.depth, dtype, dev, run)
                             + time_geglu_elementwise(rows, hidden, dtype, dev, run, args.depth))
    per_vocab = {}
    for vocab in (int(v) for v in args.vocab.split(",")):
        print(f"LM head vocabulary {vocab}:")
        per_vocab[vocab] = time_gemms(f"LM head {d}->{vocab}", args.batch_size * args.text, d, vocab, 1, dtype, dev, run)
    first_h, first_v = next(iter(per_width)), next(iter(per_vocab))
    print("per step, against the first width: " + ", ".join(
        f"hidden {h} {ms:.2f} ms ({first_h}: {per_width[first_h]:.2f}, saves {per_width[first_h] - ms:+.2f})"
        for h, ms in per_width.items()) + "; " + ", ".join(
        f"vocabulary {v} {ms:.2f} ms (saves {per_vocab[first_v] - ms:+.2f})" for v, ms in per_vocab.items()))


if __name__ == "__main__":
    main()
