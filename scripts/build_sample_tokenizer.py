"""Build the small T5-format tokenizer shipped in grr_data/assets/sample-tokenizer/.

It exists so tests and the offline `sample` set can tokenize captions without a network. It is
a SentencePiece unigram model with T5's special-piece numbering (pad 0, eos 1, unk 2, no bos),
trained on caption-like sentences composed here from fixed word lists, so rerunning the script
gives the same file. It is NOT for real training: use t5-base (or a local copy of it).

    .venv/bin/python scripts/build_sample_tokenizer.py [OUT_DIR]
"""

from __future__ import annotations

import itertools
import random
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 800
OUT_DIR = Path(__file__).resolve().parents[1] / "grr_data" / "assets" / "sample-tokenizer"

ADJECTIVES = ["red", "blue", "green", "small", "large", "old", "young", "wooden", "bright", "dark",
              "happy", "quiet", "busy", "empty", "white", "black", "yellow", "tall", "sunny", "snowy"]
SUBJECTS = ["dog", "cat", "man", "woman", "child", "horse", "bird", "car", "bus", "train", "boat",
            "bicycle", "house", "tree", "flower", "table", "chair", "kitchen", "street", "bridge",
            "mountain", "river", "beach", "city", "field", "building", "plate of food", "cup of coffee",
            "group of people", "pair of shoes", "chest x-ray", "ct scan", "mri image", "ultrasound"]
ACTIONS = ["sitting on", "standing near", "walking along", "running across", "lying on", "parked by",
           "flying over", "floating on", "looking at", "leaning against", "next to", "in front of"]
PLACES = ["the grass", "a park", "the road", "the sea", "a wooden table", "the snow", "a city street",
          "the kitchen counter", "a sandy beach", "the river bank", "a dining room", "the mountains",
          "a train station", "the living room", "a busy market", "the left lung", "the abdomen"]
EXTRAS = ["at sunset", "on a rainy day", "in the morning", "at night", "during winter", "in summer",
          "with a blue sky", "under a tree", "showing no abnormality", "with a small lesion", ""]


def caption_sentences(count: int = 900, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(["a", "the", "an old photo of a", "a close up of a", "a view of a"]),
                 rng.choice(ADJECTIVES), rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES),
                 rng.choice(EXTRAS)]
        sentence = " ".join(w for w in words if w)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "", "!"]))
    # every word list entry at least once, plus digits and punctuation seen in real captions
    out += [" ".join(group) for group in itertools.zip_longest(ADJECTIVES, SUBJECTS, fillvalue="")]
    out += ["Photo 1 of 2024, size 3x5, (cropped) - 67% zoom; 8 9 0?", "Victorian dining room: \"classic\""]
    return out


def build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(caption_sentences()) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "spiece"), model_type="unigram",
            vocab_size=VOCAB_SIZE, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            character_coverage=1.0, num_threads=1, shuffle_input_sentence=False,
            hard_vocab_limit=False, minloglevel=2,
        )
        target = out_dir / "spiece.model"
        tmp_target = target.with_name("spiece.model.tmp")
        tmp_target.write_bytes((Path(tmp) / "spiece.model").read_bytes())
        tmp_target.replace(target)
    return target


if __name__ == "__main__":
    path = build(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
