"""grr's training step against open_clip's CoCa at grr-coca's shapes, in one run on one device.

    python benchmarks/peer_openclip.py --batch-size 48 --steps 10 [--compile off|blocks|model] [--count-ops]

Needs the optional `peer` dependencies (`pip install -e ".[peer]"`: open_clip_torch, and the
torchvision build that matches the installed torch, 0.28.0 for torch 2.13, or pip replaces torch).
Each model trains on synthetic inputs with bf16 autocast on a GPU (fp32 on a CPU unless
--precision bf16), fused AdamW and clipping at 1: grr through its trainer's step
(`grr_train.train.bench`), open_clip through its own `CoCaLoss`. FLOPs per sample of each come from
`torch.utils.flop_counter` on one forward and backward, so MFU compares models of different
shapes fairly (open_clip's CoCa as built here cross-attends to 256 image tokens, grr's to 64).
`--count-ops` adds the operators one step dispatches (grr_train/train/dispatch_count.py), the CPU
proxy for kernel launches. `--compile` applies to both: grr's mode, and torch.compile of the
whole open_clip model for any mode but off.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from grr_train.model import build_model, get_config
from grr_train.runtime.parallel import peak_flops
from grr_train.train.bench import make_bench_step, synthetic_batch
from grr_train.train.dispatch_count import count_dispatched

# open_clip's CoCa at grr-coca's sizes (the figures in ../shared/gpu/FIGURES.md used these).
OPEN_CLIP_COCA = {
    "embed_dim": 768,
    "multimodal_cfg": {"context_length": 64, "width": 768, "heads": 12, "layers": 12, "mlp_ratio": 4,
                       "dim_head": 64, "n_queries": 256, "attn_pooler_heads": 12, "vocab_size": 32102},
    "vision_cfg": {"image_size": 288, "layers": 12, "width": 768, "patch_size": 18, "output_tokens": True},
    "text_cfg": {"context_length": 64, "vocab_size": 32102, "layers": 12, "heads": 12, "width": 768,
                 "embed_cls": True, "output_tokens": True},
}


def import_open_clip():
    """open_clip; where torchvision's compiled ops do not match this torch (a CPU torch beside
    the index's CUDA torchvision), its Python parts still import, which is all CoCa needs."""
    real = torch.library.register_fake

    def lenient(op, func=None, /, **kwargs):
        def apply(f):
            try:
                return real(op, f, **kwargs)
            except RuntimeError:  # the operator's library did not load
                return f
        return apply if func is None else apply(func)

    torch.library.register_fake = lenient
    try:
        import open_clip
    finally:
        torch.library.register_fake = real
    return open_clip


def open_clip_step(batch: int, dev: torch.device, dtype, compile_mode: str):
    open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.CoCa(**OPEN_CLIP_COCA).to(dev).train()
    if compile_mode != "off":
        model = torch.compile(model)
    loss_fn = open_clip.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=2.0, pad_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3, fused=True)
    images = torch.randn(batch, 3, 288, 288, device=dev)
    text = torch.randint(3, 32000, (batch, 64), device=dev)

    def forward_backward():
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(images, text)
            logits = out["logits"][:, :-1] if out["logits"].shape[1] == text.shape[1] else out["logits"]
            loss = loss_fn(out["image_features"], out["text_features"], logits, text[:, 1:], out["logit_scale"])
            loss = sum(loss) if isinstance(loss, tuple) else loss
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)  # one read-back, as grr's step has

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return step, forward_backward, params


def flops_per_sample(forward_backward, batch: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward()
    return counter.get_total_flops() / batch


def grr_forward_backward(preset: str, batch: int, dev: torch.device, dtype):
    cfg = get_config(preset)
    from grr_data.format.layout import SpecialIds
    from grr_train.train.losses import coca_loss

    special = SpecialIds.for_vocab(cfg.vocab_size)
    model = build_model(cfg).to(dev).train()
    images, ids = synthetic_batch(batch, special, cfg.image_size, torch.Generator().manual_seed(0))
    images, ids = images.to(dev), ids.to(dev)

    def forward_backward():
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(images, ids)
        coca_loss(out, ids, special, 2.0, 1.0, cfg.temperature, gather=False)["loss"].backward()

    return forward_backward


def timed(step, steps: int, dev: torch.device) -> dict:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"seconds_per_step": seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10, help="timed steps; 0 skips timing (with --count-ops)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", default="off", choices=("off", "blocks", "regions", "model"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--models", default="grr-coca,baseline-coca,open_clip")
    parser.add_argument("--count-ops", action="store_true")
    parser.add_argument("--no-flops", action="store_true", help="skip the flop_counter pass (slow on a CPU)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and dev.type == "cuda") else None
    peak = peak_flops(dev)
    results = []
    for name in args.models.split(","):
        if name == "open_clip":
            step, forward_backward, params = open_clip_step(args.batch_size, dev, dtype, args.compile)
        else:
            step, about = make_bench_step(name, args.batch_size, device=str(dev), precision=args.precision,
                                          compile=args.compile)
            forward_backward, params = grr_forward_backward(name, 1, dev, dtype), None
        for _ in range(args.warmup):
            step()
        r = {"model": name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
             "batch_size": args.batch_size, "compile": args.compile, "precision": "bf16" if dtype else "fp32"}
        if params is not None:
            r["params"] = params
        if not args.no_flops:
            r["flops_per_sample"] = flops_per_sample(forward_backward, 1 if name != "open_clip" else args.batch_size)
        if args.count_ops:
            r["ops_per_step"] = sum(count_dispatched(step).values())
        if args.steps > 0:
            r.update(timed(step, args.steps, dev))
            r["samples_per_s"] = args.batch_size / r["seconds_per_step"]
            if peak and "flops_per_sample" in r:
                r["mfu"] = r["samples_per_s"] * r["flops_per_sample"] / peak
        results.append(r)
        print(json.dumps(r) if args.json else "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items()), flush=True)
        del step, forward_backward
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    by_name = {r["model"]: r for r in results}
    if "open_clip" in by_name:
        peer = by_name["open_clip"]
        for r in results:
            if r is peer:
                continue
            ratios = {k: r[k] / peer[k] for k in ("samples_per_s", "mfu", "ops_per_step") if k in r and k in peer}
            print(f"{r['model']} / open_clip: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
