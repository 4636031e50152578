"""Seconds to caption N images with a tiny model on this machine: greedy and beam search.

    .venv/bin/python benchmarks/caption_speed.py --images 32 --beams 3 --max-len 30

The model is `grr-tiny` at the sample tokenizer's vocabulary (588 ids), freshly initialised
with its LM head sharpened so it never picks EOS: every caption runs to `--max-len`, the
worst case, and the work is the same on every run. The image encoder's time is included (one
`encode_image` per call). Prints one line per decoding and the captions' agreement.
"""

from __future__ import annotations

import argparse
import time

import torch

from grr_data.format.layout import SpecialIds
from grr_train.infer.generate import DecodeOptions, generate
from grr_train.model import build_model, get_config

VOCAB = 588


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=30)
    parser.add_argument("--preset", default="grr-tiny")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(get_config(args.preset, vocab_size=VOCAB)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    special = SpecialIds.for_vocab(VOCAB)
    images = torch.randn(args.images, 3, 288, 288)
    print(f"{args.preset}, {args.images} images, max_len {args.max_len}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    results = {}
    for beams in (1, args.beams):
        options = DecodeOptions(beams=beams, max_len=args.max_len)
        started = time.perf_counter()
        results[beams] = generate(model, images, special, options)
        seconds = time.perf_counter() - started
        print(f"  {options.describe():<32} {seconds:7.2f} s  ({args.images / seconds:.2f} images/s)")
    lengths = {len(w) for words in results.values() for w in words}
    print(f"  caption lengths {sorted(lengths)}")


if __name__ == "__main__":
    main()
