"""Each attention call site of grr-coca timed under each SDPA backend (issue 19, lever 5), forward
and backward, at the shapes, masks, dropout and q layout the model gives it.

    python benchmarks/sdpa_sites.py --batch-size 192            # on a GPU, bf16
    python benchmarks/sdpa_sites.py --batch-size 1 --reps 2     # a dry run on a CPU

Sites (calls per training step): ViT self-attention (12, 256 tokens, no mask), text
self-attention (24, 64 positions, the decoders' additive (B, 1, 64, 64) mask), cross-attention
(12, 64 positions to the 64 image tokens), the generative pooler (64 queries to 256 patches) and
the contrastive one (1 query to 64 tokens). q is laid out (B, T, H, hd) as the model now gives
it (`--q-layout bhtd`: the old layout). A backend that refuses a site's inputs is named with its
reason. The fastest backend per site and the step's attention total under it close the output.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from kernel_timer import ms_per_call
from torch.nn.attention import SDPBackend, sdpa_kernel

# "default": torch's own choice, as the model runs today
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def sites():
    """(name, calls per step, queries, keys, whether it takes the text mask)."""
    return [("ViT self-attention", 12, 256, 256, False), ("text self-attention", 24, 64, 64, True),
            ("cross-attention", 12, 64, 64, False), ("generative pooler", 1, 64, 256, False),
            ("contrastive pooler", 1, 1, 64, False)]


def make_inputs(batch, heads, head_dim, num_q, num_k, masked, q_layout, dtype, dev):
    def heads_of(t, layout):  # (B, H, T, hd) values stored in `layout`
        if layout == "bthd":
            return torch.randn(batch, t, heads, head_dim, dtype=dtype, device=dev).transpose(1, 2)
        return torch.randn(batch, heads, t, head_dim, dtype=dtype, device=dev)

    q = heads_of(num_q, q_layout).requires_grad_()
    k, v = heads_of(num_k, q_layout).requires_grad_(), heads_of(num_k, q_layout).requires_grad_()
    mask = None
    if masked:  # causal with the last quarter of keys padding, as a caption's layout gives
        allowed = torch.ones(num_q, num_k, dtype=torch.bool, device=dev).tril()
        allowed[:, 3 * num_k // 4: num_k - 1] = False
        allowed |= torch.eye(num_q, num_k, dtype=torch.bool, device=dev)
        mask = torch.zeros(batch, 1, num_q, num_k, dtype=dtype, device=dev).masked_fill_(~allowed, float("-inf"))
    return q, k, v, mask


def forward_backward(q, k, v, mask, grad, backend: str, dropout: float) -> None:
    chosen = BACKENDS[backend]
    with sdpa_kernel(chosen) if chosen is not None else nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    y.backward(grad)
    q.grad = k.grad = v.grad = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.15, help="attention dropout in training (the paper's 0.15)")
    ap.add_argument("--q-layout", choices=("bthd", "bhtd"), default="bthd")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"SDPA per call site on {name} ({str(dtype).replace('torch.', '')}), micro-batch {args.batch_size}, "
          f"dropout {args.dropout}, q stored {args.q_layout}; ms per call, forward and backward")
    best_total = default_total = 0.0
    for site, calls, num_q, num_k, masked in sites():
        q, k, v, mask = make_inputs(args.batch_size, args.heads, args.head_dim, num_q, num_k, masked, args.q_layout,
                                    dtype, dev)
        grad = torch.randn(args.batch_size, args.heads, num_q, args.head_dim, dtype=dtype, device=dev)
        times = {}
        for backend in args.backends.split(","):
            try:
                times[backend] = ms_per_call(partial(forward_backward, q, k, v, mask, grad, backend, args.dropout),
                                           dev, args.reps)
            except RuntimeError as e:  # the backend refuses these inputs (mask, dropout, device)
                reason = str(e).strip().splitlines()[0][:110]
                print(f"  {site:20s} x{calls:<3d} {backend:9s} not available: {reason}")
        for backend, ms in sorted(times.items(), key=lambda kv: kv[1]):
            print(f"  {site:20s} x{calls:<3d} {backend:9s} {ms:8.3f} ms  per step {ms * calls:8.2f} ms")
        if times:
            fastest = min((b for b in times if b != "default"), key=times.get, default="default")
            best_total += times[fastest] * calls
            default_total += times.get("default", 0.0) * calls
            print(f"  {site:20s} fastest: {fastest}")
    print(f"attention per step: {default_total:.2f} ms with torch's default choice, {best_total:.2f} ms with the "
          "fastest backend at every site")


if __name__ == "__main__":
    main()
