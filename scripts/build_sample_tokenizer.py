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
import string
import sys
from pathlib import Path

from grr_data.tokenizer import train_t5_format_model

VOCAB_SIZE = 800
OUT_DIR = Path(__file__).resolve().parents[1] / "grr_data" / "assets" / "sample-tokenizer"

ADJECTIVES = """red blue green small large old young wooden bright dark happy quiet busy empty white black
yellow tall sunny snowy orange purple pink brown grey golden silver colorful tiny huge ancient modern
rustic elegant cozy crowded lonely shiny dusty wet dry frozen cloudy foggy stormy calm wild cute funny
beautiful famous vintage classic traditional narrow wide deep shallow round square striped spotted
fluffy furry smooth rough soft hard heavy light fresh ripe delicious healthy sick broken clean dirty
abnormal normal enlarged bilateral left right upper lower chronic acute mild severe""".split()
SUBJECTS = """dog cat man woman child boy girl baby horse cow sheep goat pig bird duck eagle owl fish
elephant giraffe zebra lion tiger bear monkey rabbit squirrel deer car bus train boat ship airplane
truck motorcycle bicycle skateboard surfboard kite umbrella house cottage castle church tower tree
flower garden table chair sofa bed lamp window door kitchen bathroom bedroom street bridge road
mountain river lake waterfall beach island forest desert city village field farm building skyscraper
pizza sandwich cake salad soup bread apple banana orange laptop phone camera book clock vase bottle
guitar piano painting poster logo sign map chart diagram dress shirt jacket hat shoes bag wedding
festival concert football tennis player team soldier doctor nurse chef farmer teacher student crowd
radiograph scan image lesion nodule fracture tumor mass cyst kidney liver lung heart brain spine
chest abdomen pelvis knee shoulder vessel artery vein""".split()
ACTIONS = ["sitting on", "standing near", "walking along", "running across", "lying on", "parked by",
           "flying over", "floating on", "looking at", "leaning against", "next to", "in front of",
           "playing with", "eating", "holding", "riding", "jumping over", "swimming in", "climbing",
           "waiting at", "covered with", "surrounded by", "reflected in", "hanging above", "seen in",
           "showing", "located in", "decorated with", "made of", "painted on", "crossing"]
PLACES = ["the grass", "a park", "the road", "the sea", "a wooden table", "the snow", "a city street",
          "the kitchen counter", "a sandy beach", "the river bank", "a dining room", "the mountains",
          "a train station", "the living room", "a busy market", "the left lung", "the abdomen",
          "an airport", "a stadium", "a museum", "a restaurant", "a classroom", "a hospital", "the office",
          "a playground", "the harbor", "a supermarket", "the desert", "the jungle", "a frozen lake",
          "the right kidney", "the liver", "the spinal canal", "the chest wall", "the brain"]
EXTRAS = ["at sunset", "on a rainy day", "in the morning", "at night", "during winter", "in summer",
          "with a blue sky", "under a tree", "showing no abnormality", "with a small lesion", "",
          "in black and white", "from above", "with friends", "for sale", "on vacation", "in autumn",
          "after surgery", "with contrast enhancement", "on axial view", "in the background", ""]


def caption_sentences(count: int = 3000, seed: int = 0) -> list[str]:
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
    # every printable ASCII character, so no caption character decodes to <unk>
    out += [" ".join(string.ascii_uppercase), " ".join(string.ascii_lowercase), " ".join(string.punctuation)]
    return out


def build(out_dir: Path) -> Path:
    return train_t5_format_model(caption_sentences(), out_dir, VOCAB_SIZE, shuffle_input_sentence=False,
                                 hard_vocab_limit=False)


if __name__ == "__main__":
    path = build(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
