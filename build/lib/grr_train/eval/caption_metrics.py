"""Caption quality against several references per image: BLEU-4 and CIDEr-D.

Both follow the COCO caption evaluation (pycocoevalcap), reimplemented here because its
tokenizer needs Java:

- Tokenization (`tokenize`): lower case, the punctuation COCO's evaluation removes
  (. ? ! , : ; - quotes, brackets) becomes a space, then split on whitespace. COCO runs
  the Stanford PTB tokenizer first, which splits clitics ("dog's" -> "dog 's") and keeps
  symbols such as & or / as separate words; we give "dog s" and leave symbols attached,
  so scores can differ slightly from the official tool on such text.
- BLEU-4: corpus BLEU (Papineni et al. 2002): clipped n-gram matches against all
  references, summed over the corpus, geometric mean of 1..4-gram precisions, brevity
  penalty from the reference length closest to each hypothesis (ties: the shorter), no
  smoothing (0 when a precision is 0). Reported in [0, 1] as COCO does.
- CIDEr-D (Vedantam et al. 2015, the COCO `CIDEr` score): tf-idf n-gram vectors for
  n = 1..4 with document frequencies over the reference sets of the evaluated images,
  clipped cosine similarity to each reference, a gaussian length penalty with sigma 6,
  averaged over n-gram orders and references, times 10. As in the reference code the
  "length" used by the penalty is the sentence's number of bigrams.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# What COCO's evaluation drops after PTB tokenization: . ? ! , : ; - quotes and brackets
# (PTB turns brackets into -LRB- etc. and quotes into `` and '', which it then removes).
_PUNCTUATION = re.compile(r"""[.?!,:;\-'"`()\[\]{}]""")


def tokenize(text: str) -> list[str]:
    return _PUNCTUATION.sub(" ", text.lower()).split()


def ngram_counts(words: Sequence[str], max_n: int = 4) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"image {i} has no reference captions")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> dict:
    """Corpus BLEU-`max_n` of one hypothesis per image against that image's references.

    Returns {"bleu", "precisions" (per n), "brevity_penalty", "hyp_len", "ref_len"}.
    """
    _check(hypotheses, references)
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        words = tokenize(hyp)
        ref_words = [tokenize(r) for r in refs]
        hyp_counts = ngram_counts(words, max_n)
        max_ref: Counter = Counter()
        for rw in ref_words:
            max_ref |= ngram_counts(rw, max_n)  # union keeps the maximum count per n-gram
        for gram, count in hyp_counts.items():
            matches[len(gram) - 1] += min(count, max_ref[gram])
        for n in range(1, max_n + 1):
            totals[n - 1] += max(len(words) - n + 1, 0)
        hyp_len += len(words)
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals, strict=True)]
    if hyp_len == 0:
        brevity = 0.0
    elif hyp_len > ref_len:
        brevity = 1.0
    else:
        brevity = math.exp(1.0 - ref_len / hyp_len)
    if min(precisions) == 0.0:
        bleu = 0.0
    else:
        bleu = brevity * math.exp(sum(math.log(p) for p in precisions) / max_n)
    return {"bleu": bleu, "precisions": precisions, "brevity_penalty": brevity, "hyp_len": hyp_len, "ref_len": ref_len}


def _tfidf(counts: Counter, doc_freq: Counter, log_num_docs: float, max_n: int):
    vec: list[dict] = [{} for _ in range(max_n)]
    norm = [0.0] * max_n
    num_bigrams = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        weight = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
        vec[n][gram] = weight
        norm[n] += weight * weight
        if n == 1:
            num_bigrams += tf
    return vec, [math.sqrt(x) for x in norm], num_bigrams


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> dict:
    """CIDEr-D of one hypothesis per image; returns {"cider", "per_image"}.

    The idf comes from the references of the images scored, so a corpus of one image
    scores 0 (every n-gram has idf 0), as in the reference code.
    """
    _check(hypotheses, references)
    hyp_counts = [ngram_counts(tokenize(h), max_n) for h in hypotheses]
    ref_counts = [[ngram_counts(tokenize(r), max_n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for rc in refs for gram in rc})
    log_num_docs = math.log(float(len(references)))

    per_image = []
    for hc, refs in zip(hyp_counts, ref_counts, strict=True):
        vec, norm, length = _tfidf(hc, doc_freq, log_num_docs, max_n)
        total = [0.0] * max_n
        for rc in refs:
            vec_ref, norm_ref, length_ref = _tfidf(rc, doc_freq, log_num_docs, max_n)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                # CIDEr-D clips the hypothesis weight at the reference weight
                val = sum(min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and norm_ref[n] != 0:
                    val /= norm[n] * norm_ref[n]
                total[n] += val * penalty
        per_image.append(10.0 * (sum(total) / max_n) / len(refs))
    return {"cider": sum(per_image) / len(per_image), "per_image": per_image}


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """BLEU-4, CIDEr-D and exact match of generated captions: {"bleu4", "cider", "exact_match",
    "num_images"}. Exact match: the share of images whose caption equals one of its references
    word for word (after `tokenize`); meaningful where a caption is a function of its image
    (the shapes set), near 0 on photos."""
    return {
        "bleu4": corpus_bleu(hypotheses, references)["bleu"],
        "cider": cider_d(hypotheses, references)["cider"],
        "exact_match": exact_match(hypotheses, references),
        "num_images": len(hypotheses),
    }


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(hypotheses, references)
    hits = sum(tokenize(h) in [tokenize(r) for r in refs] for h, refs in zip(hypotheses, references, strict=True))
    return hits / len(hypotheses)
