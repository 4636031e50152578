"""The caption tokenizer: vocabulary, special ids, the 65-id layout, truncation, offline errors."""

import os
import shutil

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from grr_data.format.layout import CLS_INDEX, SEQ_LEN, SpecialIds, caption_word_ids, check_layout  # noqa: E402
from grr_data.tokenizer import (  # noqa: E402
    SAMPLE_TOKENIZER_DIR,
    SAMPLE_TOKENIZER_NAME,
    CaptionTokenizer,
    TokenizerError,
    load_tokenizer,
)

CAPTIONS = [
    "A red dog sitting on the grass at sunset.",
    "Chest x-ray showing no abnormality.",
    "Two people riding bicycles, 3 cars and a bus!",
    "Zebra {Q} @home #1 ~ `z` | <tag> & 100%",
    "x",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_sample_tokenizer_vocab_and_special_ids(tok):
    assert tok.name == SAMPLE_TOKENIZER_NAME == "grr-sample-tokenizer"
    # 486 SentencePiece pieces + T5's 100 extra ids + BOS + CLS
    assert tok.vocab_size == 486 + 100 + 2
    assert tok.special == SpecialIds.for_vocab(tok.vocab_size)
    assert (tok.special.pad, tok.special.eos, tok.special.bos, tok.special.cls) == (0, 1, 586, 587)
    assert load_tokenizer(SAMPLE_TOKENIZER_NAME).special == tok.special


def test_round_trip_gives_the_words_back(tok):
    ids, truncated = tok.encode_batch(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), SEQ_LEN) and ids.dtype == np.int64
    assert not truncated.any()
    for row, caption in zip(ids, CAPTIONS, strict=True):
        assert check_layout(row.tolist(), tok.special) is None
        assert row[0] == tok.special.bos and row[CLS_INDEX] == tok.special.cls and row[-1] == tok.special.pad
        assert tok.decode(row) == caption
        assert tok.decode_words(caption_word_ids(row.tolist(), tok.special)) == caption


def test_overlong_caption_is_cut_to_61_words(tok):
    one_piece = tok.encode_batch(["dog"])[0][0]
    assert len(caption_word_ids(one_piece.tolist(), tok.special)) == 1, "'dog' should be one piece"
    exact, longer = " ".join(["dog"] * 61), " ".join(["dog"] * 200)
    ids, truncated = tok.encode_batch([exact, longer, " ".join(["dog"] * 62)])
    assert truncated.tolist() == [False, True, True]
    for row in ids:
        assert check_layout(row.tolist(), tok.special) is None
        assert len(caption_word_ids(row.tolist(), tok.special)) == 61
        assert row[62] == tok.special.eos
    assert tok.decode(ids[1]) == exact


def test_encode_batch_tokenizes_the_list_at_once(tok):
    calls = []
    inner = tok._tok

    class Counting:
        def __call__(self, texts, **kwargs):
            calls.append(len(texts))
            return inner(texts, **kwargs)

    batched = CaptionTokenizer.__new__(CaptionTokenizer)
    batched.__dict__.update(tok.__dict__, _tok=Counting())
    ids, _ = batched.encode_batch(CAPTIONS * 50)
    assert calls == [len(CAPTIONS) * 50]
    singles = np.concatenate([tok.encode_batch([c])[0] for c in CAPTIONS])
    assert np.array_equal(ids[: len(CAPTIONS)], singles)
    empty_ids, empty_cut = tok.encode_batch([])
    assert empty_ids.shape == (0, SEQ_LEN) and empty_cut.shape == (0,)


def test_local_directory_and_clear_errors(tmp_path):
    local = tmp_path / "my-t5"
    shutil.copytree(SAMPLE_TOKENIZER_DIR, local)
    tok = load_tokenizer(str(local))
    assert tok.name == str(local.resolve()) and tok.vocab_size == 588
    with pytest.raises(TokenizerError, match="spiece.model"):
        load_tokenizer(str(tmp_path))  # a folder without a tokenizer
    with pytest.raises(TokenizerError, match="local directory holding its spiece.model|pass that directory"):
        load_tokenizer("google-t5/t5-base")  # offline: must say what to do
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_bos_and_cls_must_be_the_last_two_ids():
    from transformers import T5Tokenizer

    hf = T5Tokenizer.from_pretrained(str(SAMPLE_TOKENIZER_DIR))
    hf.add_special_tokens({"bos_token": "<bos>", "cls_token": "<cls>"})
    hf.add_tokens(["<after>"])  # pushes CLS off V-1
    with pytest.raises(TokenizerError, match="do not follow the layout"):
        CaptionTokenizer(hf, "broken")


def test_special_tokens_in_caption_text_never_reach_a_layout(tok):
    captions = ["a <s>red</s> dog", "a <pad> dog", "a <cls> dog <bos>", "a red dog"]
    ids, truncated, invalid = tok.encode_captions(captions)
    # `</s>` and `<pad>` are pieces of T5's vocabulary: flagged; `<bos>`/`<cls>` are split into text
    assert invalid.tolist() == [True, True, False, False]
    for row in ids[2:]:
        assert check_layout(row.tolist(), tok.special) is None
    assert tok.decode(ids[2]) == "a <cls> dog <bos>"
    with pytest.raises(ValueError, match="caption 0"):
        tok.encode_batch(captions)
