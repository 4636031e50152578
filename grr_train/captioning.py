"""A run's captions as text: which tokenizer turns its word ids into words, and `grr caption`.

The tokenizer is the one passed, else the one the run recorded at training (its checkpoint
holds the training set's manifest entry), else, for runs from before that was recorded, the
one named by a sharded set's manifest. Whichever it is must have the model's vocabulary size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from grr_data.dataset import DatasetInfo
from grr_data.loader import preprocess_image
from grr_data.tokenizer import load_tokenizer
from grr_train.checkpoint import load_model, read_meta, resolve_checkpoint
from grr_train.generate import DecodeOptions, generate

DecodeWords = Callable[[Sequence[int]], str]


def decode_words_for(run_or_ckpt: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                     data_dir: str | os.PathLike | None = None) -> DecodeWords:
    """The `decode_words` (word ids -> text) for a run's captions."""
    meta = read_meta(resolve_checkpoint(run_or_ckpt))
    vocab_size = int(meta["special"]["vocab_size"])
    if tokenizer is not None:
        name, origin = str(tokenizer), "--tokenizer"
    elif meta.get("tokenizer"):
        name, origin = meta["tokenizer"]["name"], f"{run_or_ckpt} (recorded at training)"
    elif data_dir is not None:
        name, origin = DatasetInfo.read(data_dir).tokenizer.name, f"{Path(data_dir) / 'manifest.json'}"
    else:
        raise ValueError(f"{run_or_ckpt} does not record its tokenizer (an older run); pass --tokenizer")
    try:
        tok = load_tokenizer(name)
    except (RuntimeError, OSError) as err:  # TokenizerError, a hub name that cannot be fetched
        raise ValueError(f"tokenizer {name!r} (from {origin}) cannot be loaded: {err}") from err
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer {name!r} (from {origin}) has {tok.vocab_size} ids but the model "
                         f"{vocab_size}; pass the tokenizer the model was trained with as --tokenizer")
    return tok.decode_words


def caption_images(run_or_ckpt: str | os.PathLike, images: Sequence[str | os.PathLike], options: DecodeOptions,
                   device: str = "cpu", batch_size: int = 32, tokenizer: str | os.PathLike | None = None,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """One caption per image file, in order; images are read and captioned `batch_size` at a time,
    so any number of them fits in memory. `progress(n)` is called after each batch."""
    options.check()
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    model, info = load_model(run_or_ckpt, device=device)
    decode_words = decode_words_for(run_or_ckpt, tokenizer, info["train_config"].get("data"))
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([preprocess_image(path) for path in chunk])  # (n, 3, 288, 288)
        captions += [decode_words(words) for words in generate(model, pixels.to(device), info["special"], options)]
        if progress is not None:
            progress(len(chunk))
    return captions
