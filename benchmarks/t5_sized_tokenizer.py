"""A tokenizer with T5's vocabulary size (32,100 pieces; 32,102 ids with BOS and CLS) for benchmarks.

The paper's model embeds and predicts over T5's 32,102 ids, and the LM head and token embedding
are ~49M of its parameters: a benchmark of the whole training path needs a set sharded with a
tokenizer of that size, and no network may be there to fetch t5-base. This builds a SentencePiece
unigram model in T5's format (pad 0, eos 1, unk 2, no bos) from a seeded corpus of English
caption words plus pseudo-words made of syllables, which gives enough distinct pieces for 32,100.
The pieces are not T5's: use it for speed, never for a model you want to keep.

    .venv/bin/python benchmarks/t5_sized_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import sentencepiece as spm

from grr_data.tokenizer import train_t5_format_model

VOCAB_SIZE = 32_100
ONSETS = "b c d f g h j k l m n p r s t v w z bl br ch cl cr dr fl fr gl gr pl pr sc sh sk sl sm sn sp st str th tr".split()
VOWELS = "a e i o u ai ea ee ie oa oo ou".split()
CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rk", "st", "ck"]


def corpus(num_lines: int = 120_000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                            for _ in range(rng.randint(1, 4))) for _ in range(120_000)})
    common = "a the of in on with and near two three photo man woman dog cat red blue small large".split()
    return [" ".join(rng.choice(words) if rng.random() < 0.7 else rng.choice(common)
                     for _ in range(rng.randint(6, 18))) for _ in range(num_lines)]


def build(out_dir: Path) -> Path:
    return train_t5_format_model(corpus(), out_dir, VOCAB_SIZE, num_threads=2)


if __name__ == "__main__":
    path = build(Path(sys.argv[1]))
    model = spm.SentencePieceProcessor(model_file=str(path))
    print(f"wrote {path}: {model.get_piece_size()} pieces")
