"""BLEU-4 and CIDEr-D on small cases computed by hand (and BLEU against sacrebleu if present)."""

import math

import pytest

from grr_train.eval.caption_metrics import caption_scores, cider_d, corpus_bleu, tokenize


def test_tokenize_lowercases_and_drops_coco_punctuation():
    assert tokenize('A Dog\'s "red" ball, (on) the-grass.') == ["a", "dog", "s", "red", "ball", "on", "the", "grass"]


def test_bleu_single_sentence_by_hand():
    out = corpus_bleu(["a b c d e"], [["a b c d f", "a b x"]])
    # clipped precisions 4/5, 3/4, 2/3, 1/2; closest reference length 5 = hypothesis length
    assert out["precisions"] == pytest.approx([4 / 5, 3 / 4, 2 / 3, 1 / 2])
    assert out["brevity_penalty"] == 1.0
    assert out["bleu"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_bleu_is_a_corpus_score_with_brevity_penalty():
    out = corpus_bleu(["a b c d e", "a b c d"], [["a b c d f", "a b x"], ["a b c d e f g h"]])
    # matches and totals summed over both sentences; lengths 9 against 5 + 8
    expected = math.exp(1 - 13 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert out["hyp_len"] == 9 and out["ref_len"] == 13
    assert out["bleu"] == pytest.approx(expected)


def test_bleu_clips_repeated_words_and_is_zero_without_4gram_match():
    out = corpus_bleu(["the the the the"], [["the cat"]])
    assert out["precisions"][0] == pytest.approx(1 / 4)
    assert out["bleu"] == 0.0


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu not installed: cross-check skipped")
    hyps = ["a man rides a horse on the beach", "two dogs play in the snow", "a red car parked by a tree"]
    refs = [
        ["a man riding a horse on a beach", "a person rides a brown horse along the beach"],
        ["two dogs are playing in the snow", "dogs play in the white snow"],
        ["a red car is parked near a tree", "a small red car next to a tree"],
    ]
    ours = corpus_bleu(hyps, refs)["bleu"]
    streams = [list(r) for r in zip(*refs, strict=True)]
    theirs = sacrebleu.corpus_bleu(hyps, streams, tokenize="none", smooth_method="none", force=True).score / 100
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_cider_identical_two_word_captions_score_five():
    # unigram and bigram cosines are 1, 3- and 4-grams are absent: 10 * (1 + 1 + 0 + 0) / 4
    out = cider_d(["a b", "x y"], [["a b"], ["x y"]])
    assert out["per_image"] == pytest.approx([5.0, 5.0])


def test_cider_partial_overlap_by_hand():
    # every n-gram has idf log 2 (df 1 of 2 images, unseen ones df clipped to 1):
    # unigram cosine {a, b} . {a, c} = 1/2, bigram 0, equal lengths
    out = cider_d(["a b", "x y"], [["a c"], ["x y"]])
    assert out["per_image"][0] == pytest.approx(10 * 0.5 / 4)
    assert out["cider"] == pytest.approx((1.25 + 5.0) / 2)


def test_cider_length_penalty_by_hand():
    # hypothesis 1 bigram, reference 7: penalty exp(-36 / 72); unigram cosine 2 / (sqrt2 sqrt8),
    # bigram cosine 1 / sqrt7
    out = cider_d(["a b", "x y"], [["a b c d e f g h"], ["x y"]])
    expected = 10 * (0.5 + 1 / math.sqrt(7)) * math.exp(-0.5) / 4
    assert out["per_image"][0] == pytest.approx(expected)


def test_cider_averages_over_references():
    out = cider_d(["a b", "x y"], [["a b", "c d"], ["x y"]])
    assert out["per_image"][0] == pytest.approx(2.5)


def test_cider_clips_repeated_ngrams():
    # "a a" has unigram weight 2 idf against the reference's 1 idf: CIDEr-D clips it, so the
    # score is below the unclipped cosine
    clipped = cider_d(["a a", "x y"], [["a b"], ["x y"]])["per_image"][0]
    unigram_cos_clipped = (1 * 1) / (2 * math.sqrt(2))
    assert clipped == pytest.approx(10 * unigram_cos_clipped / 4)


def test_caption_scores_and_errors():
    out = caption_scores(["a b c d"], [["a b c d"]])
    assert out["bleu4"] == pytest.approx(1.0) and out["num_images"] == 1
    assert out["cider"] == 0.0  # one image: every idf is log(1) - log(1) = 0
    with pytest.raises(ValueError, match="no reference"):
        caption_scores(["a"], [[]])
    with pytest.raises(ValueError, match="reference sets"):
        caption_scores(["a", "b"], [["a"]])
