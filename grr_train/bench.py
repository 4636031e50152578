"""`grr bench train`: the trainer's own step (grr_train/step.py) on synthetic inputs.

Synthetic inputs (random images, random captions in the real token layout) measure the model
step alone: the same accumulation, losses, clipping, fused AdamW, precision, compile and
activation-checkpointing settings as `grr train`, without the data loader. It reports samples/s,
MFU on a known GPU (the trainer's FLOPs per sample, `grr model summary`), peak GPU memory, and on
request the operators one step dispatches (`dispatch_count.py`, a CPU proxy for GPU launches).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from grr_data.layout import SpecialIds, build_layout
from grr_train.device import resolve_device
from grr_train.dispatch_count import count_dispatched
from grr_train.distributed import DistInfo
from grr_train.model import build_model, get_config
from grr_train.model.summary import flops_per_sample
from grr_train.parallel import parallelize, peak_flops, resolve_compile
from grr_train.precision import autocast_dtype
from grr_train.step import StepSettings, TrainStep


def synthetic_batch(batch_size: int, special: SpecialIds, image_size: int, generator: torch.Generator):
    """Random normalised images (B, 3, H, W) and random captions of 5-40 words as (B, 65) ids."""
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    rows = []
    for _ in range(batch_size):
        n = int(torch.randint(5, 41, (1,), generator=generator))
        words = torch.randint(2, special.bos, (n,), generator=generator).tolist()
        rows.append(build_layout(words, special)[0])
    return images, torch.tensor(rows, dtype=torch.int64)


def make_bench_step(preset: str, batch_size: int, accumulation: int = 1, device: str | None = None,
                    precision: str = "auto", compile: str = "off", activation_checkpointing: bool = False,
                    vocab_size: int | None = None) -> tuple[Callable[[], dict], dict]:
    """The trainer's step on one synthetic micro-batch (repeated `accumulation` times), and a description."""
    dev = torch.device(resolve_device(device or "auto"))
    cfg = get_config(preset, **({"vocab_size": vocab_size} if vocab_size else {}))
    special = SpecialIds.for_vocab(cfg.vocab_size)
    torch.manual_seed(0)
    mode = resolve_compile(compile, dev)
    model = parallelize(build_model(cfg), DistInfo(0, 0, 1, dev), compile=mode,
                        activation_checkpointing=activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.001, fused=True)
    dtype = autocast_dtype(precision, dev)
    step = TrainStep(model, optimizer, special, StepSettings(
        lambda_con=2.0, lambda_cap=1.0, grad_clip=1.0, temperature=cfg.temperature, autocast_dtype=dtype), dev)
    images, ids = synthetic_batch(batch_size, special, cfg.image_size, torch.Generator().manual_seed(0))
    # On the device already, as DALI delivers them; the CPU loader's copy is part of the loader's figure.
    micro_batches = [{"images": images.to(dev), "ids": ids.to(dev)}] * accumulation
    about = {"preset": preset, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
             "batch_size": batch_size, "accumulation": accumulation, "precision": "bf16" if dtype else "fp32",
             "compile": mode, "activation_checkpointing": activation_checkpointing,
             "vocab_size": cfg.vocab_size, "flops_per_sample": flops_per_sample(cfg), "inputs": "synthetic",
             "_device": dev}
    return lambda: step(micro_batches), about


def bench_train(preset: str, batch_size: int, steps: int, warmup: int = 2, accumulation: int = 1,
                device: str | None = None, precision: str = "auto", compile: str = "off",
                activation_checkpointing: bool = False, count_ops: bool = False,
                vocab_size: int | None = None) -> dict:
    step, about = make_bench_step(preset, batch_size, accumulation, device, precision, compile,
                                  activation_checkpointing, vocab_size)
    dev = about.pop("_device")
    for _ in tqdm(range(warmup), desc="warm-up (compiles when compiling)", leave=False):
        step()
    result = dict(about)
    if count_ops:
        ops = count_dispatched(step)
        result["ops_per_step"] = sum(ops.values())
        result["top_ops"] = dict(ops.most_common(12))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="bench", leave=False):
        step()  # ends with the step's one read-back, so the GPU's work is done when it returns
    seconds = time.perf_counter() - start
    samples_per_s = batch_size * accumulation * steps / seconds
    peak = peak_flops(dev)
    result.update({
        "steps": steps, "samples_per_s": samples_per_s, "seconds_per_step": seconds / steps,
        "mfu": samples_per_s * result["flops_per_sample"] / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
    })
    return result
