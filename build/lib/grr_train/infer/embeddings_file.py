"""The files `grr embed` writes, and the lines it prints: image and text embeddings beside what they embed.

    OUT.npy    one (N, D) float32 array: the images' rows, or the texts' (one kind only: the file
               cannot say which row is which)
    OUT.npz    `image_embeddings` (N, D), `images` (N,) their names, `text_embeddings` (M, D), `texts` (M,)
    OUT.jsonl  one line per input: {"kind": "image" | "text", "input": name or text, "embedding": [D floats]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".npy", ".npz", ".jsonl")


def embedding_rows(images: Sequence[str], image_embeds: torch.Tensor | None, texts: Sequence[str],
                   text_embeds: torch.Tensor | None) -> Iterator[dict]:
    """One {"kind", "input", "embedding"} per image, then per text."""
    for kind, names, embeds in (("image", images, image_embeds), ("text", texts, text_embeds)):
        if embeds is None:
            continue
        for name, row in zip(names, embeds.tolist(), strict=True):
            yield {"kind": kind, "input": str(name), "embedding": row}


def check_embeddings_path(path: str | os.PathLike, has_images: bool, has_texts: bool) -> None:
    """ValueError, before any work, for an output `write_embeddings` cannot write."""
    suffix = Path(path).suffix
    if suffix not in SUFFIXES:
        raise ValueError(f"--out {path}: write .npy, .npz or .jsonl")
    if suffix == ".npy" and has_images and has_texts:
        raise ValueError(f"--out {path}: a .npy file holds one kind; with images and texts write .npz or .jsonl")


def write_embeddings(path: str | os.PathLike, images: Sequence[str], image_embeds: torch.Tensor | None,
                     texts: Sequence[str], text_embeds: torch.Tensor | None) -> Path:
    """Write the embeddings to `path` in the format its suffix names (see the module's docstring)."""
    path = Path(path)
    check_embeddings_path(path, image_embeds is not None, text_embeds is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, (image_embeds if image_embeds is not None else text_embeds).numpy().astype(np.float32))
    elif path.suffix == ".npz":
        width = (image_embeds if image_embeds is not None else text_embeds).shape[1]
        empty = np.zeros((0, width), dtype=np.float32)
        np.savez(path, image_embeddings=empty if image_embeds is None else image_embeds.numpy().astype(np.float32),
                 images=np.array([str(n) for n in images], dtype=str),
                 text_embeddings=empty if text_embeds is None else text_embeds.numpy().astype(np.float32),
                 texts=np.array(list(texts), dtype=str))
    else:
        with open(path, "w") as f:
            for row in embedding_rows(images, image_embeds, texts, text_embeds):
                f.write(json.dumps(row) + "\n")
    return path
