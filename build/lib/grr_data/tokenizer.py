"""The caption tokenizer: T5's SentencePiece vocabulary plus BOS and CLS, into the 65-id layout.

`load_tokenizer(None)` gives the small tokenizer shipped in `grr_data/assets/sample-tokenizer/`
(for tests and the offline sample set only); a local directory holding `spiece.model` (or a
`tokenizer.json`) or a hub name such as `google-t5/t5-base` gives a real one. BOS and CLS are
appended to the vocabulary so they land at V-2 and V-1 (`SpecialIds.for_vocab`); with t5-base
that is 32,100 and 32,101 of 32,102, the 32,100 being 32,000 pieces plus T5's 100 extra ids.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from grr_data.format.layout import SEQ_LEN, SpecialIds, build_layout, caption_word_ids

SAMPLE_TOKENIZER_NAME = "grr-sample-tokenizer"
SAMPLE_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "sample-tokenizer"
BOS_TOKEN = "<bos>"
CLS_TOKEN = "<cls>"
MODEL_FILES = ("spiece.model", "tokenizer.json")  # a tokenizer folder holds one or both
# Tokenize at most this many pieces per caption: one more than fits tells us it was cut,
# and a 100 kB caption does not cost 100 kB of tokenizer work.
_MAX_PIECES = SEQ_LEN - 3


class TokenizerError(RuntimeError):
    pass


class CaptionTokenizer:
    """Wraps a transformers T5 tokenizer that already has BOS and CLS added.

    `fingerprint`: what tells two tokenizers apart beyond their size and special ids (which a
    different vocabulary can share): the sha256 of its model files and the library that reads
    them (`tokenizer_fingerprint`). `record()` is the manifest's `tokenizer` entry."""

    def __init__(self, hf_tokenizer, name: str, fingerprint: dict | None = None):
        self.name = name
        self.fingerprint = dict(fingerprint or {})
        self._tok = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.special = SpecialIds.for_vocab(self.vocab_size)
        got = {
            "pad": hf_tokenizer.pad_token_id,
            "eos": hf_tokenizer.eos_token_id,
            "bos": hf_tokenizer.convert_tokens_to_ids(BOS_TOKEN),
            "cls": hf_tokenizer.convert_tokens_to_ids(CLS_TOKEN),
        }
        want = {k: getattr(self.special, k) for k in got}
        if got != want:
            raise TokenizerError(
                f"tokenizer {name!r}: special ids {got} do not follow the layout {want} "
                f"(PAD 0, EOS 1, BOS V-2, CLS V-1 for V={self.vocab_size}); is it a T5 SentencePiece "
                "tokenizer without BOS/CLS of its own?"
            )

    def record(self) -> dict:
        """The manifest's `tokenizer` entry: name, vocabulary, special ids and the fingerprint."""
        sp = self.special
        return {"name": self.name, "vocab_size": self.vocab_size, "pad": sp.pad, "eos": sp.eos, "bos": sp.bos,
                "cls": sp.cls, **self.fingerprint}

    def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Lay out many captions at once: ids (N, 65) int64 and truncated (N,) bool.

        Raises ValueError naming the first caption that cannot be laid out (see `encode_captions`)."""
        ids, truncated, invalid = self.encode_captions(captions)
        if invalid.any():
            row = int(np.flatnonzero(invalid)[0])
            raise ValueError(f"caption {row} ({captions[row][:80]!r}) tokenizes to a special id")
        return ids, truncated

    def encode_captions(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `encode_batch`, plus invalid (N,) bool: captions whose text still tokenizes to PAD or
        EOS (T5's vocabulary holds the pieces `<pad>` and `</s>`, so HTML such as `</s>` in CC12M
        alt-text does); their rows of ids are left as PAD and must be skipped."""
        ids = np.zeros((len(captions), SEQ_LEN), dtype=np.int64)
        truncated = np.zeros(len(captions), dtype=bool)
        invalid = np.zeros(len(captions), dtype=bool)
        if not captions:
            return ids, truncated, invalid
        # split_special_tokens: a caption's literal `<bos>` or `<cls>` becomes ordinary pieces
        pieces = self._tok(
            list(captions), add_special_tokens=False, truncation=True, max_length=_MAX_PIECES,
            split_special_tokens=True,
        )["input_ids"]
        for row, word_ids in enumerate(pieces):
            try:
                layout, cut = build_layout(word_ids, self.special)
            except ValueError:
                invalid[row] = True
                continue
            ids[row] = layout
            truncated[row] = cut
        return ids, truncated, invalid

    def decode(self, ids: Sequence[int]) -> str:
        """The caption text of one laid-out id sequence (65 ids)."""
        return self.decode_words(caption_word_ids([int(t) for t in ids], self.special))

    def decode_words(self, word_ids: Sequence[int]) -> str:
        return self._tok.decode([int(t) for t in word_ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"CaptionTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(name_or_dir: str | os.PathLike | None = None) -> CaptionTokenizer:
    """The tokenizer named by a local directory, a hub name, or None (the bundled sample one).

    Loaded tokenizers are cached by folder and by their files' size and mtime, so a tokenizer
    file replaced under the same name is loaded (and fingerprinted) afresh."""
    source, name = resolve_tokenizer(name_or_dir)
    stamp = tuple((f, st.st_size, st.st_mtime_ns) for f in MODEL_FILES if (source / f).is_file()
                  for st in [(source / f).stat()])
    return _load(str(source), name, stamp)


def resolve_tokenizer(name_or_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """(the folder holding the tokenizer's files, the name the manifest records)."""
    if name_or_dir is None or str(name_or_dir) == SAMPLE_TOKENIZER_NAME:
        source, name = SAMPLE_TOKENIZER_DIR, SAMPLE_TOKENIZER_NAME
        if not (source / "spiece.model").is_file():
            raise TokenizerError(
                f"the bundled sample tokenizer is missing ({source}/spiece.model); rebuild it with "
                "`python scripts/build_sample_tokenizer.py`"
            )
    else:
        path = Path(name_or_dir).expanduser()
        if path.is_dir():
            if not any((path / f).is_file() for f in MODEL_FILES):
                raise TokenizerError(f"{path}: no spiece.model or tokenizer.json in this directory")
            source, name = path, str(path.resolve())
        elif path.exists() or str(name_or_dir).startswith((".", "/", "~")):
            raise TokenizerError(f"{name_or_dir}: not a directory; pass a directory holding spiece.model")
        else:
            source, name = _download(str(name_or_dir)), str(name_or_dir)
    return source, name


@functools.lru_cache(maxsize=4)
def _load(source: str, name: str, stamp: tuple) -> CaptionTokenizer:
    from transformers import T5Tokenizer  # heavy import; only callers that tokenize pay for it

    tok = T5Tokenizer.from_pretrained(source)
    # transformers 5 quietly builds an empty tokenizer from a folder it cannot read
    num_pieces = len(tok)
    if num_pieces <= 103:
        raise TokenizerError(f"{source}: the tokenizer loaded with only {num_pieces} ids; is spiece.model valid?")
    if tok.convert_tokens_to_ids(BOS_TOKEN) == tok.unk_token_id:
        tok.add_special_tokens({"bos_token": BOS_TOKEN})
    if tok.convert_tokens_to_ids(CLS_TOKEN) == tok.unk_token_id:
        tok.add_special_tokens({"cls_token": CLS_TOKEN})
    return CaptionTokenizer(tok, name, tokenizer_fingerprint(source))


def tokenizer_fingerprint(folder: str | os.PathLike) -> dict:
    """{"files_sha256": {file: sha256}, "library", "library_version"} of the tokenizer in `folder`:
    the files that define its pieces (transformers reads tokenizer.json when there is one, else
    converts spiece.model, so both are hashed when both are there) and the library that turns
    text into them. Two tokenizers are the same when their `files_sha256` are equal."""
    import transformers

    folder = Path(folder)
    files = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in MODEL_FILES if (folder / f).is_file()}
    return {"files_sha256": files, "library": "transformers", "library_version": transformers.__version__}


@functools.lru_cache(maxsize=4)
def _download(repo_id: str) -> Path:
    """A local folder holding the hub tokenizer's files; fails clearly when offline."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id, allow_patterns=["spiece.model", "tokenizer.json", "tokenizer_config.json",
                                     "special_tokens_map.json"]
        )
    except Exception as err:  # offline, unknown repo, or hub error: all need the same advice
        raise TokenizerError(
            f"could not fetch tokenizer {repo_id!r} from the hub ({type(err).__name__}: {err}). "
            "Hub names need network access; offline, copy the tokenizer's spiece.model into a "
            "directory and pass that directory (e.g. `--tokenizer /path/to/t5-base`)."
        ) from err
    if not any((Path(folder) / f).is_file() for f in MODEL_FILES):
        raise TokenizerError(f"hub repo {repo_id!r} has no spiece.model or tokenizer.json")
    return Path(folder)


def train_t5_format_model(lines: Sequence[str], out_dir: str | os.PathLike, vocab_size: int, **options) -> Path:
    """Train a SentencePiece unigram model in T5's format (pad 0, eos 1, unk 2, no bos; every
    character of `lines` a piece) on `lines`, and write it to `out_dir/spiece.model`; `options` are
    further SentencePiece trainer options (they override these). The trainer records its temporary
    paths in the model; they are blanked, so the same lines and options give the same bytes."""
    import tempfile

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from grr_data.infra.files import write_bytes_atomic

    settings = dict(model_type="unigram", vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                    pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0,
                    num_threads=1, minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n")
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(Path(tmp) / "spiece"),
                                       **{**settings, **options})
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((Path(tmp) / "spiece.model").read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = "spiece"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "spiece.model", proto.SerializeToString())
    return out / "spiece.model"
