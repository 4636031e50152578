"""`grr bench train`: training throughput of a preset on synthetic inputs (and MFU on a known GPU).

Synthetic inputs (random images, random captions in the real token layout) measure the model
step alone: forward, backward and a fused AdamW step, with the trainer's autocast and compile
settings; the data loader is not part of the figure.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from grr_data.layout import SpecialIds, build_layout
from grr_train.losses import coca_loss
from grr_train.model import build_model, get_config
from grr_train.model.summary import flops_per_sample
from grr_train.parallel import compile_blocks, enable_fast_math, peak_flops
from grr_train.precision import autocast_context, autocast_dtype


def synthetic_batch(batch_size: int, special: SpecialIds, image_size: int, generator: torch.Generator):
    """Random normalised images (B, 3, H, W) and random captions of 5-40 words as (B, 65) ids."""
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    rows = []
    for _ in range(batch_size):
        n = int(torch.randint(5, 41, (1,), generator=generator))
        words = torch.randint(2, special.bos, (n,), generator=generator).tolist()
        rows.append(build_layout(words, special)[0])
    return images, torch.tensor(rows, dtype=torch.int64)


def bench_train(preset: str, batch_size: int, steps: int, warmup: int = 2, device: str | None = None,
                precision: str = "auto", compile: bool = False) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = get_config(preset)
    special = SpecialIds.for_vocab(cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).train()
    enable_fast_math(dev)
    if compile:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.001, fused=dev.type == "cuda")
    dtype = autocast_dtype(precision, dev)
    gen = torch.Generator().manual_seed(0)
    images, ids = synthetic_batch(batch_size, special, cfg.image_size, gen)
    images, ids = images.to(dev), ids.to(dev)

    def step():
        with autocast_context(dtype, dev):
            out = model(images, ids)
        loss = coca_loss(out, ids, special, 2.0, 1.0, cfg.temperature, gather=False)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in tqdm(range(warmup), desc="warm-up", leave=False):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="bench", leave=False):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    samples_per_s = batch_size * steps / seconds
    peak = peak_flops(dev)
    fps = flops_per_sample(cfg)
    return {
        "preset": preset, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch_size": batch_size, "steps": steps, "precision": "bf16" if dtype else "fp32", "compile": compile,
        "samples_per_s": samples_per_s, "seconds_per_step": seconds / steps, "flops_per_sample": fps,
        "mfu": samples_per_s * fps / peak if peak else None, "inputs": "synthetic",
    }
