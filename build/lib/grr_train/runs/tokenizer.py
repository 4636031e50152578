"""A run's own copy of its tokenizer, `RUN/tokenizer/`: with it a run folder is all that `grr eval`,
`grr caption`, `grr export` and fine-tuning need on another machine.

The training set's manifest names its tokenizer (the bundled sample one, a local folder, or a hub
name) and, for sets sharded since fingerprints, the SHA-256 of its model files (`files_sha256`,
grr_data/tokenizer.py). `copy_tokenizer` copies those files into the run when training starts and
checks them against that fingerprint, so the copy is the tokenizer the set was made with, not
whatever the folder holds today. The run records the copy's hashes (`run_copy`), and
`load_tokenizer_checked` checks them again whenever the copy is read.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from grr_data.infra.files import fsync_path, publish
from grr_data.tokenizer import (
    MODEL_FILES,
    CaptionTokenizer,
    TokenizerError,
    load_tokenizer,
    resolve_tokenizer,
)

TOKENIZER_DIR = "tokenizer"
# Read by transformers beside the model files when present (T5's extra ids, added tokens).
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_FILES = MODEL_FILES + CONFIG_FILES


def copy_tokenizer(run_dir: str | os.PathLike, record: dict | None) -> dict | None:
    """Copy the tokenizer of a set's manifest entry `record` (`TokenizerRecord.to_dict()`) into
    `run_dir/tokenizer/`; returns the record the run stores: `record` plus
    `run_copy: {"folder": "tokenizer", "files_sha256": {model file: sha256}}`.

    A tokenizer that cannot be found here (a hub name offline, a folder gone) is not copied: training
    does not need it, so this warns, and the record comes back unchanged (the run then needs
    `--tokenizer` to turn its captions into text elsewhere, as runs did before). Files that differ
    from the set's fingerprint are refused: the set's ids would mean other words.
    A copy already in the run (a resumed run) is kept when it is the same tokenizer.
    """
    if not record:
        return record
    dest = Path(run_dir) / TOKENIZER_DIR
    name = str(record["name"])
    try:
        source = tokenizer_folder(name)
    except (TokenizerError, OSError) as err:
        print(f"warning: the run's tokenizer {name!r} is not copied into {dest} ({str(err).splitlines()[0]}); "
              "to caption or evaluate this run elsewhere pass --tokenizer", file=sys.stderr)
        return record
    files = {f: (source / f).read_bytes() for f in TOKENIZER_FILES if (source / f).is_file()}
    hashes = {f: hashlib.sha256(data).hexdigest() for f, data in files.items() if f in MODEL_FILES}
    expected = record.get("files_sha256")
    if expected and hashes != expected:
        raise ValueError(f"tokenizer {name!r} ({source}) is not the one the training set was sharded with: "
                         f"{_differences(hashes, expected)}; restore that tokenizer at {name}, or re-shard the set "
                         "with the tokenizer you have")
    stored = dict(record, run_copy={"folder": TOKENIZER_DIR, "files_sha256": hashes})
    if dest.is_dir():
        found = _hashes(dest)
        if found != hashes:
            raise ValueError(f"{dest} holds another tokenizer than {name!r} ({_differences(found, hashes)}); "
                             "this run folder was trained with another one: choose another --out")
        return stored
    tmp = dest.with_name(f".tmp-{TOKENIZER_DIR}-{os.getpid()}")
    write_tokenizer_files(files, tmp)
    publish(tmp, dest)
    return stored


def write_tokenizer_files(files: dict[str, bytes], folder: Path) -> None:
    """Write `files` ({name: bytes}) into the new folder `folder`, fsync'ed."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
        fsync_path(folder / name)


def read_tokenizer_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer files of `folder` ({name: bytes}), for copying them elsewhere (an export)."""
    return {f: (Path(folder) / f).read_bytes() for f in TOKENIZER_FILES if (Path(folder) / f).is_file()}


def expected_hashes(record: dict | None) -> dict | None:
    """The model files' SHA-256 a run's tokenizer record vouches for: its copy's, else the set's."""
    if not record:
        return None
    return (record.get("run_copy") or {}).get("files_sha256") or record.get("files_sha256") or None


def run_folder_of(run_or_ckpt: str | os.PathLike, ckpt: str | os.PathLike) -> Path | None:
    """The run folder a checkpoint belongs to: `run_or_ckpt` when the user named the run, else the
    checkpoint's parent run (`RUN/checkpoints/step-N`, `RUN/best`); None for a loose checkpoint."""
    given, ckpt = Path(run_or_ckpt), Path(ckpt)
    if given.is_dir() and given.resolve() != ckpt.resolve():
        return given
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    if ckpt.name == "best":
        return ckpt.parent
    return None


def tokenizer_copy_in(run_dir: Path | None) -> Path | None:
    """`run_dir/tokenizer/` when it holds a tokenizer."""
    if run_dir is None:
        return None
    folder = Path(run_dir) / TOKENIZER_DIR
    return folder if any((folder / f).is_file() for f in MODEL_FILES) else None


def tokenizer_folder(name: str | os.PathLike) -> Path:
    """The folder holding the files of the tokenizer `name` (as `load_tokenizer` takes it: the
    sample's name, a folder, a hub name, fetched then); TokenizerError when there is none."""
    return resolve_tokenizer(name)[0]


def load_tokenizer_checked(folder: Path, expected: dict | None) -> CaptionTokenizer:
    """The tokenizer in `folder` (a run's copy, an export) whose model files must have the SHA-256
    `expected` (`expected_hashes` of the run's record) when given."""
    # Checked before transformers reads them: it may fail on a damaged file with an unrelated message.
    found = _hashes(Path(folder))
    if expected and found != expected:
        raise ValueError(f"{folder} is not the tokenizer the model was trained with ({_differences(found, expected)}); "
                         "the copy is damaged or replaced: restore it, or pass the run's tokenizer as --tokenizer")
    return load_tokenizer(folder)


def _hashes(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in MODEL_FILES if (folder / f).is_file()}


def _differences(found: dict, expected: dict) -> str:
    parts = []
    for name in sorted(set(found) | set(expected)):
        if name not in found:
            parts.append(f"{name} missing")
        elif name not in expected:
            parts.append(f"{name} not in the fingerprint")
        elif found[name] != expected[name]:
            parts.append(f"{name} has SHA-256 {found[name][:12]}..., expected {expected[name][:12]}...")
    return ", ".join(parts) or "same files"
