"""Makes small sharded sets in the CONTRACTS.md format for tests and benchmarks.

`make_shardset(dir, ...)` writes `DIR/manifest.json` and `DIR/<split>/shard-NNNNNN.tar` (+ `.idx`)
with `grr_data.format.records.ShardWriter`; images are crops of scikit-image's photographs (shorter side
288, random aspect) or solid colours, captions are random word ids laid out by `build_layout`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from grr_data.format.layout import LAYOUT_VERSION, SEQ_LEN, SpecialIds, build_layout
from grr_data.format.records import SAMPLE_CHECKSUMS, ShardWriter, checksum_path, sample_members
from grr_data.infra.files import sha256_file

VOCAB_SIZE = 1000
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "cat")


def _photos() -> list[np.ndarray]:
    import skimage.data as data

    out = []
    for name in PHOTOS:
        img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        out.append(img[..., :3])
    return out


def photo_jpeg(rng: np.random.Generator, photos: list[np.ndarray], short: int = 288) -> bytes:
    """A random crop of a real photograph, resized so its shorter side is `short`."""
    src = photos[rng.integers(len(photos))]
    h, w = src.shape[:2]
    ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(src[y : y + ch, x : x + cw])
    aspect = rng.uniform(1.0, 1.6)
    size = (round(short * aspect), short) if rng.random() < 0.5 else (short, round(short * aspect))
    return jpeg_bytes(img.resize(size, Image.BICUBIC))


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_shardset(
    root,
    shard_sizes=(10, 10, 5),
    split: str = "train",
    seed: int = 0,
    images: list[bytes] | None = None,
    short: int = 288,
    checksums: bool = True,
) -> Path:
    """Write a set with one split; `images` (one JPEG each, in order) overrides the photos.
    `checksums=False` makes a set as grr sharded them before per-sample checksums (no `.crc`).

    Sample keys are `s{global number:06d}`; the first caption id of sample g is g % 900 + 10, so
    a test can tell samples apart from their ids alone.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    special = SpecialIds.for_vocab(VOCAB_SIZE)
    photos = _photos() if images is None else None
    shards, g = [], 0
    for s, size in enumerate(shard_sizes):
        rel = f"{split}/shard-{s:06d}.tar"
        with ShardWriter(root / rel) as writer:
            for _ in range(size):
                jpg = images[g] if images is not None else photo_jpeg(rng, photos, short)
                words = [g % 900 + 10, *rng.integers(10, 900, size=rng.integers(0, 12)).tolist()]
                ids, _ = build_layout(words, special)
                writer.write(f"s{g:06d}", sample_members(jpg, f"caption {g}", ids, {"n": g}))
                g += 1
        shards.append({"path": rel, "num_samples": size, "sha256": sha256_file(root / rel)})
        if not checksums:
            checksum_path(root / rel).unlink()
    manifest = {
        "layout_version": LAYOUT_VERSION,
        "seq_len": SEQ_LEN,
        **({"sample_checksums": SAMPLE_CHECKSUMS} if checksums else {}),
        "tokenizer": {
            "name": "test",
            "vocab_size": VOCAB_SIZE,
            "pad": special.pad,
            "eos": special.eos,
            "bos": special.bos,
            "cls": special.cls,
        },
        "splits": {split: {"num_samples": g, "shards": shards}},
        "skipped": {},
        "truncated_captions": 0,
        "split_rule": "test set",
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def sample_number(ids_row) -> int:
    """The global sample number written into a caption's first word id (for sets made here)."""
    return int(ids_row[1]) - 10
