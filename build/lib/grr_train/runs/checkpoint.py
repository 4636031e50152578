"""Run folders and checkpoints (CONTRACTS.md "Checkpoints"): atomic saves, checksums, pruning, loading.

A run folder holds `config.json`, `metrics.jsonl`, `checkpoints/step-NNNNNNN/` and, when
early stopping keeps one, `best/`. A checkpoint folder holds `model.safetensors` (the
unwrapped model's weights), `state.pt` (optimizer, schedule, early stopper, loader positions
and RNG states per rank: tensors and plain containers only, read with `weights_only=True`),
`meta.json` (step, epoch, the model and training configs and the tokenizer, so a checkpoint
folder is enough to rebuild its model and turn its captions into text) and `SHA256SUMS` (the
SHA-256 of the other three, in `sha256sum -c` format). A sharded checkpoint (`parallelism=fsdp`,
`grr_train/runs/sharded.py`) holds `sharded/` (model and optimizer through
torch.distributed.checkpoint, one file per saving process and `.metadata`) instead of the weights
file, with the optimizer there rather than in `state.pt`; meta.json lists every file and
SHA256SUMS covers them all. `load_weights` reads either kind into a plain model.

Durability: every file is written into a temporary folder and fsync'ed, the folder renamed into
place and the parent folder fsync'ed, so a crash or power loss leaves either the old or the new
checkpoint, never a torn one. Integrity: `checkpoint_problem` checks sizes, the weights' header
and the checksums; `checkpoints/latest` names the newest checkpoint, and `latest_checkpoint`
falls back to the newest intact one (saying so) when the one it names is missing or damaged.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model as save_safetensors_model

from grr_data.format.layout import SpecialIds
from grr_data.infra.files import fsync_path, publish, sha256_file, write_json_atomic, write_text_atomic

FORMAT_VERSION = 1
WEIGHTS, STATE, META, SUMS = "model.safetensors", "state.pt", "meta.json", "SHA256SUMS"
SHARDED = "sharded"  # the torch.distributed.checkpoint folder of a sharded checkpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, unreadable); the message names the file."""


def write_run_config(run_dir: Path, model_config: dict, train_config: dict, special: SpecialIds,
                     tokenizer: dict | None) -> None:
    """`tokenizer`: the training set's manifest.json entry (name, vocab_size, special ids), so
    captions can be decoded to text without the training data."""
    write_json_atomic(Path(run_dir) / "config.json", {"model": model_config, "train": train_config,
                                                      "special": special.to_dict(), "tokenizer": tokenizer})


# ---- saving ----------------------------------------------------------------------------------

class _KeepWriteError:
    """The file torch.save writes through, keeping the OSError of a failed write: torch replaces
    it with a RuntimeError that names neither the cause nor the file (`basic_ios::clear: iostream
    error`, `unexpected pos`)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        out = _KeepWriteError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors writes from Rust and reports the OS error in its message only
    return re.search(r"\(os error (28|122)\)", str(err)) is not None


@contextmanager
def explain_full_disk(what: str, path: Path):
    """Turn a full disk into one OSError that says so and names `path`."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        if not _is_disk_full(err):
            raise
        raise OSError(errno.ENOSPC, f"No space left on device while {what} {path}; free space on that disk, "
                                    "then continue with --resume (the checkpoints saved before are intact)") from err


def checkpoint_folder(run_dir: Path, step: int | None) -> Path:
    """Where the checkpoint of `step` goes (None: the run's `best/`)."""
    return Path(run_dir) / "best" if step is None else Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def temporary_folder(final: Path, pid: int | None = None) -> Path:
    """The folder a checkpoint is written into before it is renamed to `final` (the pid of the
    process that publishes it: `remove_stale_temporaries` knows the pattern)."""
    return final.parent / f".tmp-{final.name}-{os.getpid() if pid is None else pid}"


def _folder_files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def finish_checkpoint_dir(tmp: Path, state: dict, meta: dict, digests: dict[str, str] | None = None) -> None:
    """Write `state.pt`, `meta.json` (listing every file in `tmp` with its size) and SHA256SUMS
    (every file; `digests`: those already hashed, by name), and fsync them all. On failure `tmp`
    is removed."""
    try:
        _torch_save(state, tmp / STATE)
        names = [name for name in _folder_files(tmp) if name not in (META, SUMS)]
        files = {name: {"size": (tmp / name).stat().st_size} for name in names}
        record = {"format_version": FORMAT_VERSION, **meta, "files": files, "checksums": SUMS}
        (tmp / META).write_text(json.dumps(record, indent=2) + "\n")
        # Hashed from what was just written (the page cache): about 1.7 GB/s, so ~3 s at grr-coca size.
        digests = digests or {}
        (tmp / SUMS).write_text("".join(f"{digests.get(name) or sha256_file(tmp / name)}  {name}\n"
                                        for name in [*names, META]))
        for name in [*names, META, SUMS]:
            fsync_path(tmp / name)
        for folder in {(tmp / name).parent for name in names} - {tmp}:
            fsync_path(folder)  # the checkpoint folder itself is fsync'ed by `publish`
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def place_checkpoint(tmp: Path, final: Path, keep: int | None = None) -> Path:
    """Rename the finished `tmp` to `final`; for a `step-*` folder also point `latest` at it and keep
    the newest `keep`."""
    with explain_full_disk("saving the checkpoint", final):
        publish(tmp, final)
        if final.name.startswith("step-"):
            write_text_atomic(final.parent / "latest", final.name + "\n")
    if keep is not None:
        for old in sorted(p for p in final.parent.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    return final


def save_whole(final: Path, model: torch.nn.Module, state: dict, meta: dict, keep: int | None) -> Path:
    tmp = temporary_folder(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with explain_full_disk("saving the checkpoint", final):
        try:
            save_safetensors_model(model, str(tmp / WEIGHTS))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finish_checkpoint_dir(tmp, state, meta)
    return place_checkpoint(tmp, final, keep)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what a process that died while saving left in `run_dir`; returns the removed paths.

    Unfinished checkpoint folders (`checkpoints/.tmp-step-*`, `.tmp-best-*`, each as large as a
    checkpoint) and `latest` temporaries go; a replaced folder (`.NAME.old-PID`) goes too, unless
    the process died before its successor was in place, in which case it is put back as NAME.
    Call it only while this process owns the run folder (on resume, before saving anything).
    """
    run_dir = Path(run_dir)
    removed = []
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            old = re.fullmatch(r"\.(best|step-\d+)\.old-\d+", path.name)
            if old and not (parent / old.group(1)).exists():
                os.replace(path, parent / old.group(1))
                continue
            if not (old or re.fullmatch(r"\.tmp-(best|step-\d+)-\d+|\.latest\.tmp-\d+", path.name)):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


# ---- checking --------------------------------------------------------------------------------

def _read_sums(ckpt: Path) -> dict[str, str]:
    """SHA256SUMS as {file name: hex digest}; raises ValueError for a line that does not parse."""
    sums = {}
    for number, line in enumerate((ckpt / SUMS).read_text().splitlines(), 1):
        match = re.fullmatch(r"([0-9a-f]{64})  ([\w.-]+(?:/[\w.-]+)*)", line)
        if match is None:
            raise ValueError(f"{ckpt / SUMS}:{number} is not a 'SHA-256  name' line")
        sums[match.group(2)] = match.group(1)
    return sums


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why the checkpoint folder `ckpt` cannot be used, naming the file, or None when it can.

    Checked: meta.json reads; every file it lists has the recorded size; the weights' safetensors
    header parses (a sharded checkpoint has none); and every file's SHA-256 matches SHA256SUMS
    (hashing the whole checkpoint: about 3 s at grr-coca's 4.7 GB). Checkpoints saved before SHA256SUMS was written have no
    checksums: for them only the sizes (when recorded) and the weights' header are checked, so a
    changed byte of the same size goes unnoticed.
    """
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as err:
        return f"cannot read {ckpt / META} ({err})"
    for name, entry in meta.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{path} has {path.stat().st_size} bytes, {META} says {entry['size']}"
    if not meta.get("sharded"):
        try:
            with safe_open(ckpt / WEIGHTS, framework="pt"):
                pass
        except (OSError, SafetensorError) as err:
            return f"{ckpt / WEIGHTS} is not a readable safetensors file ({err})"
    if not (ckpt / SUMS).is_file():
        return f"{ckpt / SUMS} is missing" if "checksums" in meta else None
    try:
        sums = _read_sums(ckpt)
    except (OSError, ValueError) as err:
        return f"cannot read {ckpt / SUMS} ({err})"
    for name in [*meta.get("files", (WEIGHTS, STATE)), META]:
        if name not in sums:
            return f"{ckpt / SUMS} has no checksum for {name}"
        if sha256_file(ckpt / name) != sums[name]:
            return f"{ckpt / name} is damaged: its SHA-256 differs from the one recorded in {SUMS} when it was saved"
    return None


_warned: set[str] = set()


def _warn_once(text: str) -> None:
    """A damaged-checkpoint warning, once per process: a command looks a checkpoint up several
    times (a resume: the settings check, the trainer, the model; `grr eval`: tokenizer, weights)."""
    if text not in _warned:
        _warned.add(text)
        print(text, file=sys.stderr)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names or, when that one is incomplete or damaged, the
    newest intact `step-*` folder (with a warning on stderr); None when the run has none."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    ckpt = latest.parent / latest.read_text().strip()
    problem = checkpoint_problem(ckpt)
    if problem is None:
        return ckpt
    for other in sorted((p for p in latest.parent.glob("step-*") if p.is_dir() and p != ckpt), reverse=True):
        if checkpoint_problem(other) is None:
            _warn_once(f"warning: {latest} names {ckpt.name}, which cannot be used ({problem}); "
                       f"using {other.name}, the newest intact checkpoint")
            return other
    raise FileNotFoundError(f"{latest} names {ckpt.name}, which cannot be used ({problem}), and no other "
                            f"checkpoint in {latest.parent} is intact; start a new run (another --out)")


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    """An intact checkpoint folder from a checkpoint folder, its weights file, or a run folder.

    A checkpoint named directly must be intact (else CheckpointError naming the damaged file).
    A run folder gives its `best/` or, when it has none or that one is damaged (a warning), its
    newest intact checkpoint (`latest_checkpoint`).
    """
    path = Path(run_or_ckpt)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if (path / WEIGHTS).is_file() or (path / META).is_file():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path} is not a usable checkpoint: {problem}; name another checkpoint, "
                                  "or the run folder to use its newest intact one")
        return path
    best = path / "best"
    if best.is_dir():
        problem = checkpoint_problem(best)
        if problem is None:
            return best
        _warn_once(f"warning: {best} cannot be used ({problem}); using the run's newest intact checkpoint "
                   "instead (the latest saved, not the best by validation)")
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None:
        raise FileNotFoundError(
            f"{path}: not a run folder with checkpoints, nor a checkpoint folder holding {WEIGHTS}"
        )
    return ckpt


# ---- loading ---------------------------------------------------------------------------------

def read_meta(ckpt: Path) -> dict:
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not JSON ({err}); the checkpoint is damaged") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def load_state(ckpt: Path, device: str | torch.device = "cpu") -> dict:
    path = Path(ckpt) / STATE
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot be loaded ({err})") from err


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDED).is_dir()
