"""GPU memory of one bf16 training step of a preset on one device, estimated on the CPU.

    python benchmarks/step_memory.py grr-coca-1b --batch-sizes 48 192

Fixed part, per trainable parameter: 16 B (fp32 weights, gradients and AdamW's two moments) plus
2 B for autocast's bf16 copies of the weights, which the autocast cache keeps until backward.
Activations: the tensors autograd saves for backward, measured under bf16 autocast on the CPU
(`saved_tensors_hooks`, each storage counted once, parameters left out) on reduced-depth copies of
the preset (1 or 2 ViT blocks, 1+1 or 2+2 text blocks) at 1 and 2 samples, which gives the bytes per
sample of one ViT block, one unimodal+multimodal pair and the rest, then scaled to the preset's
depths and the micro-batch. The trainer's own losses are used (`grr_train/train/step.py`).

With --activation-checkpointing each block keeps only its input (residual-stream dtype as measured)
and one block's activations live again during its recompute.

This is the eager step's figure, and an upper bound for a per-block compiled one: checked against
the one GPU measurement we have (docs/LOG.md, H200, grr-coca, per-block compile, peak allocated
14.2 GB at micro-batch 48 and 38.8 GB at 192) it gives 17.7 and 49.5 GB, i.e. the compiled step
kept 0.67-0.75 x the activations counted here (Inductor fuses the norms, RoPE and GEGLU and saves
fewer intermediates; gradients are also allocated while activations are being freed). On a CPU,
against the peak resident memory of two real bf16 steps of a 2-block copy of grr-coca-1b at
micro-batch 16, it gave 3.20 GB for 3.15 measured. Not counted: the CUDA context and workspaces
(~1 GB) and allocator fragmentation. The GPU's attention kernels save what the CPU's flash kernel
does (q, k, v, output, log-sum-exp), not the score matrices.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from grr_data.format.layout import SpecialIds
from grr_train.model import build_model, get_config
from grr_train.train.bench import synthetic_batch
from grr_train.train.losses import caption_loss, contrastive_loss

GB = 1e9


def saved_bytes(model, cfg, batch_size: int) -> tuple[int, int]:
    """Bytes autograd saves in one bf16-autocast forward of `batch_size` samples, and the residual
    stream's bytes per element at the first ViT block's input."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    special = SpecialIds.for_vocab(cfg.vocab_size)
    images, ids = synthetic_batch(batch_size, special, cfg.image_size, torch.Generator().manual_seed(0))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    residual = []
    hook = model.vit.blocks[0].register_forward_pre_hook(lambda _m, args: residual.append(args[0].element_size()))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, ids)
        ignored = (special.bos, special.pad, special.cls)
        # the losses' own saved tensors (the float32 logit chunks among them) count too
        contrastive = contrastive_loss(out.image_embed, out.text_embed, cfg.temperature, gather=False)
        caption_loss(out.logits, ids[:, 1:], ignored, reduction="sum") + contrastive
    hook.remove()
    return sum(seen.values()), residual[0]


def per_sample(cfg) -> tuple[int, int]:
    """Saved bytes per sample (difference between 2 samples and 1) and the residual element size."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    one, size = saved_bytes(model, cfg, 1)
    two, _ = saved_bytes(model, cfg, 2)
    return two - one, size


def estimate(cfg, batch_sizes: list[int], activation_checkpointing: bool) -> list[dict]:
    """Fixed, activation and total GB at each micro-batch, and the measured bytes per sample."""
    cfg = dataclasses.replace(cfg, dropout=0.0)  # dropout masks: a few % more, not counted
    small = dict(depth=1, text_depth=1, multimodal_depth=1)
    base, residual_bytes = per_sample(dataclasses.replace(cfg, **small))
    vit_block = per_sample(dataclasses.replace(cfg, **{**small, "depth": 2}))[0] - base
    text_pair = per_sample(dataclasses.replace(cfg, **{**small, "text_depth": 2, "multimodal_depth": 2}))[0] - base
    rest = base - vit_block - text_pair
    text_depth = max(cfg.text_depth, cfg.multimodal_depth)
    if activation_checkpointing:
        inputs = residual_bytes * cfg.width * (
            cfg.depth * cfg.num_patches + (cfg.text_depth + cfg.multimodal_depth) * cfg.context_length)
        activations = rest + inputs + max(vit_block, text_pair)
    else:
        activations = rest + cfg.depth * vit_block + text_depth * text_pair
    num_params = sum(p.numel() for p in build_model(cfg, device="meta").parameters() if p.requires_grad)
    fixed = 18 * num_params
    rows = []
    for b in batch_sizes:
        rows.append({
            "micro_batch": b, "activation_checkpointing": activation_checkpointing,
            "params": num_params, "fixed_gb": fixed / GB, "activations_gb": b * activations / GB,
            "total_gb": (fixed + b * activations) / GB,
            "per_sample_mb": {"vit_block": vit_block / 1e6, "text_pair": text_pair / 1e6, "rest": rest / 1e6,
                              "all": activations / 1e6},
            "activation_bytes_per_sample": activations,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[48, 192])
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    for r in estimate(get_config(args.preset), args.batch_sizes, args.activation_checkpointing):
        mb = r["per_sample_mb"]
        print(f"{args.preset} micro-batch {r['micro_batch']}"
              f"{' with activation checkpointing' if r['activation_checkpointing'] else ''}: "
              f"{r['total_gb']:.1f} GB = {r['fixed_gb']:.1f} GB fixed (18 B x {r['params']:,} params) + "
              f"{r['activations_gb']:.1f} GB activations ({mb['all']:.0f} MB/sample: ViT block {mb['vit_block']:.1f}, "
              f"text pair {mb['text_pair']:.1f}, rest {mb['rest']:.1f})")


if __name__ == "__main__":
    main()
