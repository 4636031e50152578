"""CPU ms per training step with and without `trim_text_padding` (text decoders over the caption
positions a batch uses only), on short captions like the shapes set's.

    .venv/bin/python benchmarks/trim_text.py --rounds 4 --steps 5

Each model is the trainer's step (grr_train/train/step.py TrainStep: forward, backward, clipping, fused
AdamW) on one fixed batch of random images and captions of --min-words..--max-words random words,
fp32, dropout 0 (the demo's), on --threads threads (default 1, as `grr demo` trains). The two
arms share one model and optimizer and run in alternation, A B A B .., `--steps` timed steps
each after `--warmup` untimed ones, so a busy machine slows both alike. Prints, per model, the
median ms per step of each arm, the per-round ratios and the ratio of the medians.

Models: `grr-tiny-p16` is the demo's preset (16-px patches, 18 x 18 = 324 image tokens),
`grr-tiny` as it is (48-px, 6 x 6); `--models grr-tiny-p32` adds 32-px patches (9 x 9), the
demo's preset before it moved to 16 px. The vocabulary defaults to 73 ids,
about the shapes tokenizer's (27 words, 36 letters and digits, a few specials, BOS and CLS);
T5's 32,102 (--vocab-size 32102) makes the LM head, which trimming also shrinks, dominate.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grr_data.format.layout import SpecialIds, build_layout  # noqa: E402
from grr_train.model import build_model, get_config  # noqa: E402
from grr_train.train.step import StepSettings, TrainStep  # noqa: E402

MODELS = {"grr-tiny-p16": ("grr-tiny-p16", {}), "grr-tiny": ("grr-tiny", {}),
          "grr-tiny-p32": ("grr-tiny-p16", {"patch_size": 32})}


def make_batch(batch_size: int, special: SpecialIds, image_size: int, min_words: int, max_words: int):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch_size):
        n = int(torch.randint(min_words, max_words + 1, (1,), generator=g))
        rows.append(build_layout(torch.randint(2, special.bos, (n,), generator=g).tolist(), special)[0])
    return {"images": torch.randn(batch_size, 3, image_size, image_size, generator=g),
            "ids": torch.tensor(rows, dtype=torch.int64)}


def timed_steps(step: TrainStep, batch: dict, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step([batch])
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step([batch])
        times.append((time.perf_counter() - started) * 1e3)
    return times


def bench(name: str, args) -> None:
    preset, overrides = MODELS[name]
    cfg = dataclasses.replace(get_config(preset, vocab_size=args.vocab_size, dropout=0.0), **overrides)
    special = SpecialIds.for_vocab(cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.001, fused=True)
    arms = {trim: TrainStep(model, optimizer, special, StepSettings(
        lambda_con=2.0, lambda_cap=1.0, grad_clip=1.0, temperature=cfg.temperature, trim_text_padding=trim),
        torch.device("cpu")) for trim in (False, True)}
    batch = make_batch(args.batch_size, special, cfg.image_size, args.min_words, args.max_words)
    kept = model._kept_positions(model._key_valid(batch["ids"][:, : cfg.context_length])[0])
    positions = cfg.context_length if kept is None else len(kept)
    times: dict[bool, list[float]] = {False: [], True: []}
    ratios = []
    for _ in range(args.rounds):
        round_ms = {}
        for trim, step in arms.items():
            t = timed_steps(step, batch, args.warmup, args.steps)
            times[trim] += t
            round_ms[trim] = statistics.median(t)
        ratios.append(round_ms[True] / round_ms[False])
    full, trimmed = statistics.median(times[False]), statistics.median(times[True])
    print(f"{name} ({cfg.num_patches} image tokens, vocab {cfg.vocab_size}), batch {args.batch_size}, "
          f"{args.min_words}-{args.max_words} words: text positions 64 -> {positions}")
    print(f"  full {full:8.1f} ms/step   trimmed {trimmed:8.1f} ms/step   trimmed/full {trimmed / full:.3f}"
          f"   (per round: {', '.join(f'{r:.3f}' for r in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS)[:2], choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=14)
    parser.add_argument("--vocab-size", type=int, default=73)
    parser.add_argument("--rounds", type=int, default=4, help="A/B alternations")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each arm's timed ones")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, forward+backward+AdamW")
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
