"""The token layout every caption is stored in (paper 3.2; docs/DESIGN.md, "Contracts").

`BOS w1..wn EOS PAD.. CLS PAD`: 65 ids, so the model reads 64 inputs (`ids[:-1]`) and
predicts 64 targets (`ids[1:]`). CLS always stands at index 63 and the final PAD at 64.
The special ids follow T5's numbering (PAD 0, EOS 1) with BOS and CLS appended to the
vocabulary, so for a vocabulary of V ids BOS is V-2 and CLS is V-1.

This module is the part of `grr_data` that `grr_train` may import: it has no dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

SEQ_LEN = 65
CONTEXT_LENGTH = SEQ_LEN - 1  # what the model sees
CLS_INDEX = SEQ_LEN - 2
LAYOUT_VERSION = 1
PAD_ID = 0
EOS_ID = 1


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    bos: int
    cls: int
    vocab_size: int

    @classmethod
    def for_vocab(cls, vocab_size: int) -> SpecialIds:
        return cls(pad=PAD_ID, eos=EOS_ID, bos=vocab_size - 2, cls=vocab_size - 1, vocab_size=vocab_size)

    @property
    def ignored_targets(self) -> tuple[int, int, int]:
        """Targets the caption loss skips (paper 3.5)."""
        return (self.bos, self.pad, self.cls)

    def to_dict(self) -> dict:
        return asdict(self)


def build_layout(word_ids: Sequence[int], special: SpecialIds) -> tuple[list[int], bool]:
    """Lay out one caption's word ids; returns the 65 ids and whether the words were cut.

    The words are cut so that BOS, EOS, CLS and the final PAD always fit (61 words at most).
    Raises ValueError when a word id is one of the special ids: that would be an invalid layout.
    """
    specials = (special.pad, special.eos, special.bos, special.cls)
    if any(t in specials for t in word_ids):
        raise ValueError(f"special_token_in_caption: word ids {list(word_ids)} contain a special id {specials}")
    max_words = SEQ_LEN - 4
    truncated = len(word_ids) > max_words
    words = list(word_ids[:max_words])
    ids = [special.bos, *words, special.eos]
    ids += [special.pad] * (CLS_INDEX - len(ids))
    ids += [special.cls, special.pad]
    assert len(ids) == SEQ_LEN
    return ids, truncated


def caption_word_ids(ids: Sequence[int], special: SpecialIds) -> list[int]:
    """The word ids of a laid-out caption: what stands between BOS and the first EOS."""
    out = []
    for token in ids[1:]:
        if token in (special.eos, special.cls):
            break
        if token != special.pad:
            out.append(int(token))
    return out


def check_layout(ids: Sequence[int], special: SpecialIds) -> str | None:
    """Why `ids` is not a valid layout, or None when it is."""
    if len(ids) != SEQ_LEN:
        return f"has {len(ids)} ids, expected {SEQ_LEN}"
    if ids[0] != special.bos:
        return f"starts with {ids[0]}, expected BOS {special.bos}"
    if ids[CLS_INDEX] != special.cls or ids[-1] != special.pad:
        return "does not end with CLS PAD"
    try:
        eos = list(ids).index(special.eos)
    except ValueError:
        return "has no EOS"
    if eos >= CLS_INDEX:
        return "EOS stands after the CLS position"
    if any(t != special.pad for t in ids[eos + 1 : CLS_INDEX]):
        return "has non-PAD ids between EOS and CLS"
    if any(t in (special.bos, special.cls, special.pad) for t in ids[1:eos]):
        return "has a special id among the words"
    if any(not 0 <= t < special.vocab_size for t in ids):
        return "has an id outside the vocabulary"
    return None
