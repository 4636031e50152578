"""`grr bench train`: the trainer's own step (grr_train/train/step.py) on synthetic inputs.

Synthetic inputs (random images, random captions in the real token layout) measure the model
step alone: the same accumulation, losses, clipping, fused AdamW, precision, compile and
activation-checkpointing settings as `grr train`, without the data loader. It reports samples/s,
MFU on a known GPU (the trainer's FLOPs per sample, `grr model summary`), peak GPU memory, and on
request the operators one step dispatches (`dispatch_count.py`, a CPU proxy for GPU launches).

`read_back`: "per-step" ends each step with its one read-back, as the trainer runs today;
"deferred" launches step N+1 before reading step N's metrics (`TrainStep.launch`), so the host
never waits for the GPU between steps; "both" times the two on one compiled model. `inductor_mode`: one of torch.compile's modes (e.g. max-autotune-no-cudagraphs)
applied to whatever the compile setting compiles, to try before making it a training setting.
`settings`: training settings the step reads (`BENCH_SETTINGS`: dropout, the speed switches,
micro-batch groups, trimmed text), as `grr train` takes them, resolved the same way
(`StepSettings.for_run`), so each speed lever can be timed on and off.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from grr_data.format.layout import SpecialIds, build_layout
from grr_data.infra.progress import progress
from grr_train.model import build_model, get_config
from grr_train.model.summary import flops_per_sample
from grr_train.runtime.device import resolve_device
from grr_train.runtime.distributed import DistInfo
from grr_train.runtime.parallel import parallelize, peak_flops, resolve_compile, resolve_switch
from grr_train.runtime.precision import autocast_dtype
from grr_train.train.config import TrainConfig
from grr_train.train.dispatch_count import count_dispatched
from grr_train.train.step import PendingStep, StepSettings, TrainStep

INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The training settings `--set` may give `grr bench train` (the rest describe a run, not a step).
BENCH_SETTINGS = ("dropout", "aligned_widths", "fused_caption_loss", "clip_in_optimizer", "inductor_random",
                  "micro_batch_groups", "trim_text_padding")


def bench_config(settings: dict | None, compile: str) -> TrainConfig:
    """The pretraining recipe with `settings` (BENCH_SETTINGS only) and `compile`, checked."""
    other = sorted(set(settings or {}) - set(BENCH_SETTINGS))
    if other:
        raise ValueError(f"grr bench train takes --set {', '.join(BENCH_SETTINGS)}; not {', '.join(other)}")
    cfg = replace(TrainConfig(), compile=compile, **(settings or {}))
    cfg.validate()
    return cfg


def synthetic_batch(batch_size: int, special: SpecialIds, image_size: int, generator: torch.Generator):
    """Random normalised images (B, 3, H, W) and random captions of 5-40 words as (B, 65) ids."""
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    rows = []
    for _ in range(batch_size):
        n = int(torch.randint(5, 41, (1,), generator=generator))
        words = torch.randint(2, special.bos, (n,), generator=generator).tolist()
        rows.append(build_layout(words, special)[0])
    return images, torch.tensor(rows, dtype=torch.int64)


class BenchStep:
    """The trainer's step on fixed micro-batches: `step()` waits for its metrics, `step.launch()`
    returns them pending (`TrainStep.launch`)."""

    def __init__(self, train_step: TrainStep, micro_batches: list[dict]):
        self.train_step, self.micro_batches = train_step, micro_batches

    def __call__(self) -> dict:
        return self.train_step(self.micro_batches)

    def launch(self) -> PendingStep:
        return self.train_step.launch(self.micro_batches)


def set_inductor_mode(mode: str | None) -> None:
    """Make every later torch.compile use `mode`'s inductor options (the process's global config)."""
    if mode is None:
        return
    if mode not in INDUCTOR_MODES:
        raise ValueError(f"unknown inductor mode {mode!r}; expected one of {', '.join(INDUCTOR_MODES)}")
    import torch._inductor

    for key, value in torch._inductor.list_mode_options(mode).items():  # dotted keys, as torch.compile sets them
        setattr(torch._inductor.config, key, value)


def make_bench_step(preset: str, batch_size: int, accumulation: int = 1, device: str | None = None,
                    precision: str = "auto", compile: str = "off", activation_checkpointing: bool = False,
                    vocab_size: int | None = None, inductor_mode: str | None = None,
                    settings: dict | None = None) -> tuple[BenchStep, dict]:
    """The trainer's step on one synthetic micro-batch (repeated `accumulation` times), and a description."""
    dev = torch.device(resolve_device(device or "auto"))
    run = bench_config(settings, compile)
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    if "dropout" in (settings or {}):
        overrides["dropout"] = run.dropout
    cfg = get_config(preset, **overrides)
    special = SpecialIds.for_vocab(cfg.vocab_size)
    set_inductor_mode(inductor_mode)
    torch.manual_seed(0)
    mode = resolve_compile(compile, dev)
    aligned = resolve_switch("aligned_widths", run.aligned_widths, dev)
    model = parallelize(build_model(cfg), DistInfo(0, 0, 1, dev), compile=mode,
                        activation_checkpointing=activation_checkpointing, aligned_widths=aligned,
                        inductor_random=run.inductor_random)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.001, fused=True)
    dtype = autocast_dtype(precision, dev)
    step_settings = StepSettings.for_run(run, cfg.temperature, 1, dtype, dev, mode)
    if batch_size % step_settings.contrastive_groups:
        raise ValueError(f"--batch-size {batch_size} does not split into {step_settings.contrastive_groups} "
                         "contrastive groups (micro_batch_groups)")
    step = TrainStep(model, optimizer, special, step_settings, dev)
    images, ids = synthetic_batch(batch_size, special, cfg.image_size, torch.Generator().manual_seed(0))
    # On the device already, as DALI delivers them; the CPU loader's copy is part of the loader's figure.
    micro_batches = [{"images": images.to(dev), "ids": ids.to(dev)}] * accumulation
    about = {"preset": preset, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
             "batch_size": batch_size, "accumulation": accumulation, "precision": "bf16" if dtype else "fp32",
             "compile": mode, "inductor_mode": inductor_mode, "activation_checkpointing": activation_checkpointing,
             "vocab_size": cfg.vocab_size, "flops_per_sample": flops_per_sample(cfg), "inputs": "synthetic",
             "dropout": cfg.dropout, "levers": {
                 "aligned_widths": aligned, "fused_caption_loss": step_settings.fused_caption_loss,
                 "clip_in_optimizer": step_settings.clip_in_optimizer, "inductor_random": run.inductor_random,
                 "contrastive_groups": step_settings.contrastive_groups,
                 "trim_bucket": step_settings.trim_bucket if run.trim_text_padding else None},
             "_device": dev}
    return BenchStep(step, micro_batches), about


def run_steps(step: BenchStep, steps: int, defer: bool, desc: str = "bench") -> dict:
    """Run `steps` steps; the last one's metrics are read before returning, so the GPU's work is
    done. `defer`: each step's metrics are read after the next step is launched."""
    pending = None
    last = None
    for _ in progress(range(steps), desc=desc, leave=False):
        if not defer:
            last = step()
            continue
        launched = step.launch()
        if pending is not None:
            last = pending.result()
        pending = launched
    return pending.result() if pending is not None else last


READ_BACKS = ("per-step", "deferred", "both")


def bench_train(preset: str, batch_size: int, steps: int, warmup: int = 2, accumulation: int = 1,
                device: str | None = None, precision: str = "auto", compile: str = "off",
                activation_checkpointing: bool = False, count_ops: bool = False,
                vocab_size: int | None = None, read_back: str = "per-step",
                inductor_mode: str | None = None, settings: dict | None = None) -> list[dict]:
    """One result per read-back variant. "both" times the two on the same model (compiled once),
    in alternating rounds (per-step, deferred, per-step, deferred), so drift hits both alike."""
    if read_back not in READ_BACKS:
        raise ValueError(f"read_back must be one of {', '.join(READ_BACKS)}, got {read_back!r}")
    started = time.perf_counter()
    step, about = make_bench_step(preset, batch_size, accumulation, device, precision, compile,
                                  activation_checkpointing, vocab_size, inductor_mode, settings)
    dev = about.pop("_device")
    run_steps(step, warmup, defer=False, desc="warm-up (compiles when compiling)")
    about["setup_and_warmup_s"] = time.perf_counter() - started
    if count_ops:
        ops = count_dispatched(step)
        about["ops_per_step"] = sum(ops.values())
        about["top_ops"] = dict(ops.most_common(12))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    variants = ["per-step", "deferred"] if read_back == "both" else [read_back]
    rounds = 2 if read_back == "both" else 1
    seconds, last = dict.fromkeys(variants, 0.0), {}
    for _ in range(rounds):
        for v in variants:
            start = time.perf_counter()
            last[v] = run_steps(step, steps, defer=v == "deferred", desc=f"bench ({v} read-back)")
            seconds[v] += time.perf_counter() - start
    peak = peak_flops(dev)
    results = []
    for v in variants:
        timed = steps * rounds
        samples_per_s = batch_size * accumulation * timed / seconds[v]
        results.append({**about, "read_back": v, "steps": timed, "samples_per_s": samples_per_s,
                        "seconds_per_step": seconds[v] / timed,
                        "mfu": samples_per_s * about["flops_per_sample"] / peak if peak else None,
                        "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
                        "last_loss": last[v]["loss"] if last[v] else None})
    return results
