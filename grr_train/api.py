"""grr's Python API, all in this module: a trained model ready to embed, classify and caption.

    import grr_train.api as grr
    model = grr.load("runs/finetune-grr")      # a run, one of its checkpoints, or a `grr export` folder
    print(model.caption(["photo.jpg"]))

`load` gives a `GrrModel`: the CoCa model (eval mode), its tokenizer and `preprocess`, which
turns an image file into exactly the tensor the loaders give (`grr_data.loader.preprocess_image`).
Embeddings are L2-normalised, as the contrastive loss uses them; zero-shot scores are their
cosine similarities divided by the model's temperature, softmaxed over the class names;
captions come from `grr_train.infer.generate` (greedy, beam search batched over images, sampling).
Images are paths, the files' bytes, or a folder (its image files, sorted by name).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from grr_data.format.layout import SpecialIds
from grr_data.loader import preprocess_image
from grr_train.infer.captioning import caption_files, check_image_files, tokenizer_for
from grr_train.infer.export import download_export, is_export, load_export
from grr_train.infer.generate import DecodeOptions
from grr_train.runs.tokenizer import expected_hashes, load_tokenizer_checked
from grr_train.runs.weights import load_model
from grr_train.runtime.device import resolve_device

__all__ = ["GrrModel", "Prediction", "image_files", "load"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
Images = str | os.PathLike | Sequence[str | os.PathLike | bytes]


@dataclass(frozen=True)
class Prediction:
    image: str  # the image's path ("<bytes N>" for the N-th image given as bytes)
    label: str  # the most likely class name
    score: float  # its probability
    probs: dict[str, float]  # every class name's probability, in the order given


def load(path: str | os.PathLike, device: str = "cpu", tokenizer: str | os.PathLike | None = None) -> GrrModel:
    """A run folder (its best checkpoint, else its newest intact one), a checkpoint folder, a
    `grr export` folder or the hub repo id of one, on `device` (cpu, cuda, cuda:N, auto). The
    tokenizer is the run's copy (or the export's files), else the one the run recorded;
    `tokenizer` overrides it."""
    device = resolve_device(device)
    if not Path(path).exists() and str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        path = download_export(str(path))
    if is_export(path):
        model, config = load_export(path, device)
        folder = Path(tokenizer) if tokenizer is not None else Path(path)
        tok = load_tokenizer_checked(folder, None if tokenizer is not None else expected_hashes(config["tokenizer"]))
        special = SpecialIds(**config["special"])
    else:
        model, info = load_model(path, device=device)
        tok = tokenizer_for(path, tokenizer, info["train_config"].get("data"))
        special = info["special"]
    if tok.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model {path} "
                         f"{model.cfg.vocab_size}; pass the one it was trained with as tokenizer=")
    return GrrModel(model, tok, special, device)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of `folder` (by suffix), sorted by name; ValueError when it has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return found


class GrrModel:
    """A loaded model with its tokenizer; see the module's docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, special: SpecialIds, device: str) -> None:
        self.model, self.tokenizer, self.special, self.device = model, tokenizer, special, device

    @property
    def temperature(self) -> float:
        """The contrastive temperature the model was trained with (its logits are similarity / this)."""
        return self.model.cfg.temperature

    def preprocess(self, image: str | os.PathLike | bytes) -> torch.Tensor:
        """One image file (path or bytes) -> (3, 288, 288) float32, exactly as the loaders give it."""
        return preprocess_image(image)

    @torch.no_grad()
    def embed_images(self, images: Images, batch_size: int = 32) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings, on the CPU."""
        found = _image_list(images)
        out = [self.model.encode_image(self._pixels(found[i : i + batch_size]))[0].float().cpu()
               for i in range(0, len(found), batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings (the unimodal decoder at CLS), on the CPU."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of texts, not one string")
        out = []
        for start in range(0, len(texts), batch_size):
            ids, _ = self.tokenizer.encode_batch(list(texts[start : start + batch_size]))  # (n, 65)
            out.append(self.model.encode_text(torch.from_numpy(ids).to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.cfg.width)

    def classify(self, images: Images, class_names: Sequence[str], template: str = "a photo of a {}.",
                 batch_size: int = 32) -> list[Prediction]:
        """Zero-shot: each image against `template.format(name)` for every class name; probabilities
        are the softmax of cosine similarity / temperature over the classes."""
        if isinstance(class_names, str) or len(class_names) < 2:
            raise ValueError(f"classify needs a list of at least two class names, got {class_names!r}")
        found = _image_list(images)
        texts = self.embed_texts([template.format(name) for name in class_names])  # (C, D)
        probs = (self.embed_images(found, batch_size) @ texts.T / self.temperature).softmax(dim=-1)  # (N, C)
        predictions = []
        for i, (image, row) in enumerate(zip(found, probs.tolist(), strict=True)):
            best = max(range(len(class_names)), key=row.__getitem__)
            predictions.append(Prediction(_name(image, i), class_names[best], row[best],
                                          dict(zip(class_names, row, strict=True))))
        return predictions

    def caption(self, images: Images, beams: int = 1, top_k: int | None = None, top_p: float | None = None,
                temperature: float = 1.0, min_len: int = 1, max_len: int = 30, seed: int | None = None,
                batch_size: int = 32) -> list[str]:
        """One caption per image: greedy by default, `beams=N` beam search (all images of a batch
        searched together), `top_k` / `top_p` sampling (with `temperature`, `seed`)."""
        options = DecodeOptions(beams=beams, top_k=top_k, top_p=top_p, temperature=temperature, min_len=min_len,
                                max_len=max_len, seed=seed)
        return caption_files(self.model, self.special, self.tokenizer.decode_words, _image_list(images), options,
                             self.device, batch_size)

    def _pixels(self, images: Sequence[str | os.PathLike | bytes]) -> torch.Tensor:
        return torch.stack([preprocess_image(image) for image in images]).to(self.device)  # (n, 3, 288, 288)

    def __repr__(self) -> str:
        return f"GrrModel({self.model.cfg.width}-wide CoCa, {self.tokenizer!r}, device={self.device!r})"


def _image_list(images: Images) -> list:
    """A list of image paths or bytes from a folder, one path, or a sequence; missing files named."""
    if isinstance(images, str | os.PathLike):
        images = image_files(images) if Path(images).is_dir() else [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    check_image_files([p for p in images if not isinstance(p, bytes | bytearray | memoryview)])
    return images


def _name(image, index: int) -> str:
    return f"<bytes {index}>" if isinstance(image, bytes | bytearray | memoryview) else str(image)
