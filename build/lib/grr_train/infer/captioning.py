"""A run's captions as text: which tokenizer turns its word ids into words, and captioning images.

The tokenizer is the one passed, else the run's own copy (`RUN/tokenizer/`, made when training
started; a checkpoint folder finds it in its parent run), else the one the run recorded at
training (its checkpoint holds the training set's manifest entry), else, for runs from before
that was recorded, the one named by a sharded set's manifest. Whichever it is must have the
model's vocabulary size; the run's copy must also be the files the run recorded (their SHA-256).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from grr_data.format.manifest import Manifest
from grr_data.loader import preprocess_image
from grr_data.tokenizer import CaptionTokenizer
from grr_train.infer.generate import DecodeOptions, generate
from grr_train.runs.checkpoint import read_meta, resolve_checkpoint
from grr_train.runs.tokenizer import (
    expected_hashes,
    load_tokenizer_checked,
    run_folder_of,
    tokenizer_copy_in,
    tokenizer_folder,
)

DecodeWords = Callable[[Sequence[int]], str]


class TokenizerChoice(NamedTuple):
    folder: Path  # holds the tokenizer's files
    origin: str  # where the choice came from, for messages
    expected: dict | None  # the model files' SHA-256 the folder must have (a run's copy), else None
    vocab_size: int  # the model's


def choose_tokenizer(run_or_ckpt: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                     data: Manifest | str | os.PathLike | None = None) -> TokenizerChoice:
    """Which tokenizer turns a run's word ids into words (see the module's docstring)."""
    ckpt = resolve_checkpoint(run_or_ckpt)
    meta = read_meta(ckpt)
    record, vocab_size = meta.get("tokenizer"), int(meta["special"]["vocab_size"])
    copy = tokenizer_copy_in(run_folder_of(run_or_ckpt, ckpt))
    if tokenizer is None and copy is not None:
        return TokenizerChoice(copy, "the run's copy", expected_hashes(record), vocab_size)
    if tokenizer is not None:
        name, origin = str(tokenizer), "--tokenizer"
    elif record:
        name, origin = record["name"], f"{run_or_ckpt} (recorded at training)"
    elif data is not None:
        manifest = Manifest.of(data)
        name, origin = manifest.tokenizer.name, str(manifest.path)
    else:
        raise ValueError(f"{run_or_ckpt} does not record its tokenizer (an older run); pass --tokenizer")
    try:
        return TokenizerChoice(tokenizer_folder(name), f"{name!r} from {origin}", None, vocab_size)
    except (RuntimeError, OSError) as err:  # TokenizerError, a hub name that cannot be fetched
        raise ValueError(f"tokenizer {name!r} (from {origin}) cannot be loaded: {err}") from err


def load_choice(choice: TokenizerChoice) -> CaptionTokenizer:
    """The chosen tokenizer, checked: its files' SHA-256 when it is a run's copy, its size always."""
    try:
        tok = load_tokenizer_checked(choice.folder, choice.expected)
    except (RuntimeError, OSError) as err:  # TokenizerError: files transformers cannot read
        raise ValueError(f"tokenizer {choice.folder} ({choice.origin}) cannot be loaded: {err}") from err
    if tok.vocab_size != choice.vocab_size:
        raise ValueError(f"tokenizer {choice.folder} ({choice.origin}) has {tok.vocab_size} ids but the model "
                         f"{choice.vocab_size}; pass the tokenizer the model was trained with as --tokenizer")
    return tok


def tokenizer_for(run_or_ckpt: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                  data: Manifest | str | os.PathLike | None = None) -> CaptionTokenizer:
    """The tokenizer of a run's captions (see the module's docstring for which one)."""
    return load_choice(choose_tokenizer(run_or_ckpt, tokenizer, data))


def decode_words_for(run_or_ckpt: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                     data: Manifest | str | os.PathLike | None = None) -> DecodeWords:
    """The `decode_words` (word ids -> text) for a run's captions."""
    return tokenizer_for(run_or_ckpt, tokenizer, data).decode_words


def check_image_files(images: Sequence[str | os.PathLike]) -> None:
    """FileNotFoundError naming the first of `images` that is not a file (and how many more)."""
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))


def caption_files(model: torch.nn.Module, special, decode_words: DecodeWords, images: Sequence, options: DecodeOptions,
                  device: str = "cpu", batch_size: int = 32, progress: Callable[[int], None] | None = None,
                  preprocess: Callable[[object], torch.Tensor] = preprocess_image) -> list[str]:
    """One caption per image (a path or the file's bytes, or what `preprocess` takes), in order, from
    a loaded model; images are read and captioned `batch_size` at a time, so any number of them fits
    in memory; `progress(n)` is called after each batch."""
    options.check()
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([preprocess(image) for image in chunk])  # (n, 3, 288, 288)
        captions += [decode_words(words) for words in generate(model, pixels.to(device), special, options)]
        if progress is not None:
            progress(len(chunk))
    return captions
