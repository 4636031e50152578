"""A word-level tokenizer for the shapes set, written beside the fetched pairs (`OUT/tokenizer/`).

The bundled sample tokenizer splits the shapes words into up to seven pieces ("triangle" is six),
so a caption is 8-32 ids; a tiny model learns whole words far faster. This tokenizer makes every
caption word exactly one piece, so captions are 3-12 ids. It is an ordinary T5-format
SentencePiece model (pad 0, eos 1, unk 2, no bos; the letters and digits as pieces, so any text
still encodes), trained on sentences drawn from the manifest's own templates: the same manifest
gives the same bytes, and `grr data shard --tokenizer OUT/tokenizer` uses it like any other.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import sentencepiece as spm

from grr_data.fetch.common import FetchError
from grr_data.tokenizer import train_t5_format_model

TOKENIZER_DIR = "tokenizer"
_SENTENCES = 3000


def _sentences(spec) -> list[str]:
    """Captions drawn from the templates (any combination, held-out ones too: the words matter,
    not the pairs), plus the alphabet so every character has a piece."""
    rng = random.Random(0)
    colours, shapes, sizes = sorted(spec.colours), sorted(spec.shapes), sorted(spec.sizes)
    lines = []
    for i in range(_SENTENCES):
        values = {"colour": rng.choice(colours), "shape": rng.choice(shapes), "size": rng.choice(sizes),
                  "colour2": rng.choice(colours), "shape2": rng.choice(shapes), "size2": rng.choice(sizes),
                  "relation": rng.choice(sorted(spec.relations.values())), "count": rng.choice(sorted(spec.counts))}
        values["shapes"] = spec.plurals[values["shape"]]
        template = spec.templates[sorted(spec.templates)[i % len(spec.templates)]]
        lines.append(template.format(**values))
    # every letter and digit also inside a word (a word of the captions never splits, so none occurs there)
    lines += [" ".join(string.ascii_lowercase + string.digits), "x" + string.ascii_lowercase + string.digits] * 3
    return lines


def write_shapes_tokenizer(spec, out: Path) -> Path:
    """Train the word-level model for `spec`'s words into `out/tokenizer/spiece.model`; returns the folder."""
    folder = Path(out) / TOKENIZER_DIR
    words = sorted(spec.words())
    # Each word as a user-defined piece with SentencePiece's word-start mark: one piece per word.
    train_t5_format_model(_sentences(spec), folder, len(words) + len(string.ascii_lowercase + string.digits) + 8,
                          user_defined_symbols=["\u2581" + w for w in words], shuffle_input_sentence=False,
                          hard_vocab_limit=False)
    _check_one_piece_per_word(folder, words)
    return folder


def _check_one_piece_per_word(folder: Path, words: list[str]) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    split = [w for w in words if len(processor.encode(w, out_type=str)) != 1]
    if split:
        raise FetchError(f"{folder}: the shapes tokenizer splits {split}; report this as a bug")
