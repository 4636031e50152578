"""What `grr data shard` reads, chosen once per run: img2dataset tars (grr_data.shard.tars) or a
user's own images, a folder with captions beside them or a CSV/JSONL list (grr_data.shard.plain),
as one `ShardInputs`: the input kind and its units, one worker job each, in processing order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grr_data.shard.plain import find_plain_inputs
from grr_data.shard.samples import IMAGE_EXTENSIONS, InputError, InputKind
from grr_data.shard.tars import TarInput, find_tars


@dataclass(frozen=True)
class ShardInputs:
    """What a run reads, in processing order: one unit per worker job (an input tar, or a chunk
    of a plain input)."""

    kind: InputKind
    units: list[tuple[str, str | None, tuple | None]]  # (tar path or chunk name, split subfolder, chunk items)
    fingerprint: list | dict  # kept in params.json: a changed input is not resumed

    @property
    def has_folders(self) -> bool:
        return self.units[0][1] is not None


def find_inputs(input_path: Path) -> ShardInputs:
    """The input tars of a fetch output, else the chunks of a plain input."""
    if input_path.is_file():
        plain = find_plain_inputs(input_path)
    elif not input_path.is_dir():
        raise InputError(f"{input_path}: no such file or folder; pass the folder `grr data fetch` wrote, a folder "
                         "of images with captions beside them, or a .csv/.jsonl list of path and caption")
    else:
        tars = find_tars(input_path)
        if tars:
            return ShardInputs(TarInput(), [(str(p), split, None) for p, split in tars],
                               [[str(p.relative_to(input_path)), p.stat().st_size, p.stat().st_mtime_ns]
                                for p, _ in tars])
        plain = find_plain_inputs(input_path)
        if plain is None:
            raise InputError(f"{input_path}: no .tar files (nor train/ val/ test/ subfolders holding them) and no "
                             f"images ({', '.join(IMAGE_EXTENSIONS)}) with captions beside them (name.txt); "
                             "expected `grr data fetch` output or a folder of captioned images")
    name = f"{input_path.resolve()}:chunk-"
    return ShardInputs(plain.kind, [(f"{name}{i:06d}", None, items) for i, items in enumerate(plain.chunks)],
                       plain.fingerprint)
