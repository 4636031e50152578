"""grr's Python API, all in this module: a trained model ready to embed, classify and caption, and
the same model in open_clip's shape for code written for open_clip (clip_benchmark among it).

    import grr_train.api as grr
    model = grr.load("runs/finetune-grr")      # a run, one of its checkpoints, a `grr export` folder or its hub id
    print(model.caption(["photo.jpg"]))

    model, _, preprocess = grr.create_model_and_transforms("runs/finetune-grr")   # as open_clip's
    tokenizer = grr.get_tokenizer("runs/finetune-grr")
    image = model.encode_image(preprocess(pil_image)[None])                        # (1, D)
    text = model.encode_text(tokenizer(["a dog", "a cat"]))                        # (2, D)

`load` gives a `GrrModel`: the CoCa model (eval mode), its tokenizer and `preprocess`, which
turns an image into exactly the tensor the loaders give for its file (`grr_data.loader.preprocess_image`).
Embeddings are L2-normalised, as the contrastive loss uses them; zero-shot scores are their
cosine similarities divided by the model's temperature, softmaxed over the class names;
captions come from `grr_train.infer.generate` (greedy, beam search batched over images, sampling).
Images are paths, the files' bytes, Pillow images, tensors as `preprocess` gives them
((3, S, S); a (N, 3, S, S) tensor is N images), or a folder (its image files, sorted by name).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from grr_data.format.layout import SEQ_LEN, SpecialIds
from grr_data.loader import preprocess_image
from grr_train.infer.captioning import caption_files, check_image_files, tokenizer_for
from grr_train.infer.export import download_export, is_export, load_export, read_export_config
from grr_train.infer.generate import DecodeOptions
from grr_train.runs.checkpoint import read_meta, resolve_checkpoint
from grr_train.runs.tokenizer import expected_hashes, load_tokenizer_checked
from grr_train.runs.weights import load_model
from grr_train.runtime.device import resolve_device

__all__ = ["GrrModel", "OpenClipModel", "Prediction", "Preprocess", "Tokenizer", "create_model_and_transforms",
           "get_tokenizer", "image_files", "image_paths", "load"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
Image_ = str | os.PathLike | bytes | Image.Image | torch.Tensor
Images = str | os.PathLike | torch.Tensor | Sequence[Image_]
ACCEPTED = ("image file paths, a folder, the files' bytes, PIL images, or tensors as model.preprocess gives "
            "them ((3, S, S), or (N, 3, S, S) for N images)")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Prediction:
    image: str  # the image's path; "<bytes N>", "<PIL N>", "<tensor N>" for the N-th image given so
    label: str  # the most likely class name
    score: float  # its probability
    probs: dict[str, float]  # every class name's probability, in the order given


def load(path: str | os.PathLike, device: str = "cpu", tokenizer: str | os.PathLike | None = None) -> GrrModel:
    """A run folder (its best checkpoint, else its newest intact one), a checkpoint folder, a
    `grr export` folder or the hub repo id of one, on `device` (cpu, cuda, cuda:N, auto). The
    tokenizer is the run's copy (or the export's files), else the one the run recorded;
    `tokenizer` overrides it."""
    device = resolve_device(device)
    folder = _local(path)
    if is_export(folder):
        model, _ = load_export(folder, device)
    else:
        model, _ = load_model(folder, device=device)
    tok, special = _tokenizer(folder, tokenizer)
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


def image_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from files and folders (a folder: its image files, sorted by name); the first
    missing one named (FileNotFoundError)."""
    files = [f for p in map(Path, paths) for f in (image_files(p) if p.is_dir() else [p])]
    check_image_files(files)
    return files


class GrrModel:
    """A loaded model with its tokenizer; see the module's docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, special: SpecialIds, device: str) -> None:
        self.model, self.tokenizer, self.special, self.device = model, tokenizer, special, device

    @property
    def temperature(self) -> float:
        """The contrastive temperature the model was trained with (its logits are similarity / this)."""
        return self.model.cfg.temperature

    def preprocess(self, image: Image_) -> torch.Tensor:
        """One image (a file's path or bytes, a PIL image) -> (3, 288, 288) float32, exactly as the
        loaders give it; a tensor is checked and returned as it is."""
        if isinstance(image, torch.Tensor):
            size = self.model.cfg.image_size
            if image.shape != (3, size, size) or not image.is_floating_point():
                raise ValueError(f"an image tensor must be (3, {size}, {size}) floats as model.preprocess gives "
                                 f"them, got {image.dtype} {tuple(image.shape)}; pass the PIL image or file instead")
            return image
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
            predictions.append(Prediction(image_name(image, i), class_names[best], row[best],
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
                             self.device, batch_size, preprocess=self.preprocess)

    def _pixels(self, images: Sequence[Image_]) -> torch.Tensor:
        return torch.stack([self.preprocess(image) for image in images]).to(self.device)  # (n, 3, 288, 288)

    def __repr__(self) -> str:
        return f"GrrModel({self.model.cfg.width}-wide CoCa, {self.tokenizer!r}, device={self.device!r})"


# ---------------------------------------------------------------- open_clip's shape


class OpenClipModel(torch.nn.Module):
    """A grr CoCa with open_clip's methods: `encode_image(images)` (B, 3, S, S) from `Preprocess`,
    `encode_text(ids)` (B, 65) from `Tokenizer`, `forward(image, text)` -> (image features, text
    features, logit scale) and `logit_scale` (log 1/temperature). grr's embeddings are L2-normalised
    whatever `normalize` says (the model computes them so); the flag is there for open_clip's calls."""

    def __init__(self, coca: torch.nn.Module) -> None:
        super().__init__()
        self.coca = coca
        self.register_buffer("logit_scale", torch.tensor(1 / coca.cfg.temperature).log(), persistent=False)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.coca.encode_image(image)[0]

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.coca.encode_text(text)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        return (None if image is None else self.encode_image(image),
                None if text is None else self.encode_text(text), self.logit_scale.exp())


class Preprocess:
    """open_clip's `preprocess`: one PIL image (or an image file's path or bytes) -> (3, 288, 288)
    float32, exactly as grr's loaders give it. A plain class, so DataLoader workers can pickle it."""

    def __call__(self, image: str | os.PathLike | bytes | Image.Image) -> torch.Tensor:
        return preprocess_image(image)

    def __repr__(self) -> str:
        return "grr Preprocess(RGB, bilinear resize to 288 x 288 (aspect not kept), ImageNet mean and std)"


class Tokenizer:
    """open_clip's tokenizer: a text or a list of texts -> LongTensor (N, 65) in grr's layout, what
    `encode_text` takes (`context_length` is always 65)."""

    context_length = SEQ_LEN

    def __init__(self, caption_tokenizer) -> None:
        self.tokenizer = caption_tokenizer

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if context_length not in (None, SEQ_LEN):
            raise ValueError(f"grr's text layout is {SEQ_LEN} ids; context_length {context_length} cannot be used")
        return torch.from_numpy(self.tokenizer.encode_batch([texts] if isinstance(texts, str) else list(texts))[0])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)


def create_model_and_transforms(path: str | os.PathLike, device: str = "cpu",
                                tokenizer: str | os.PathLike | None = None):
    """(model, preprocess for training, preprocess for evaluation), as open_clip's function returns
    them, for a run, a checkpoint, an export or its hub id (`load`'s arguments). The two transforms
    are the same: grr trains on the loaders' resize without augmentation. The model is in eval mode."""
    loaded = load(path, device, tokenizer)
    model = OpenClipModel(loaded.model).to(loaded.device).eval()
    return model, Preprocess(), Preprocess()


def get_tokenizer(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """open_clip's `get_tokenizer` for a run, a checkpoint, an export or its hub id (without loading weights)."""
    return Tokenizer(_tokenizer(_local(path), tokenizer)[0])


# ---------------------------------------------------------------- helpers


def _local(path: str | os.PathLike) -> Path:
    """The folder `path` names: a local one, else a hub export it names (downloaded). A path that
    is not there is "not found", with the names beside it that come closest, never a hub error."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    text = str(path)
    if HUB_ID.fullmatch(text) and not Path(text.split("/")[0]).exists():
        return download_export(text)
    near = []
    if local.parent.is_dir():
        near = difflib.get_close_matches(local.name, [p.name for p in local.parent.iterdir()], n=3)
    hint = f"; did you mean {' or '.join(str(local.parent / n) for n in near)}?" if near else ""
    raise FileNotFoundError(f"{path}: not found (no such run, checkpoint or export folder){hint}")


def _tokenizer(folder: Path, tokenizer: str | os.PathLike | None):
    """(the tokenizer of the run, checkpoint or export `folder`, its special ids), checked against the model's size."""
    if is_export(folder):
        config = read_export_config(folder)
        source = Path(tokenizer) if tokenizer is not None else folder
        tok = load_tokenizer_checked(source, None if tokenizer is not None else expected_hashes(config["tokenizer"]))
        special, vocab_size = SpecialIds(**config["special"]), config["model_config"]["vocab_size"]
    else:
        meta = read_meta(resolve_checkpoint(folder))
        tok = tokenizer_for(folder, tokenizer, meta["train_config"].get("data"))
        special, vocab_size = SpecialIds(**meta["special"]), meta["model_config"]["vocab_size"]
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model {folder} "
                         f"{vocab_size}; pass the one it was trained with as tokenizer=")
    return tok, special


def _image_list(images: Images) -> list:
    """A list of images from a folder, one path, a batch tensor or a sequence; missing files named,
    other kinds refused with the kinds that are accepted."""
    if isinstance(images, str | os.PathLike):
        images = image_files(images) if Path(images).is_dir() else [images]
    elif isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, bytes | bytearray | memoryview | Image.Image):
        images = [images]
    elif not isinstance(images, Sequence):
        raise TypeError(f"images must be {ACCEPTED}; got {type(images).__name__}")
    images = list(images)
    if not images:
        raise ValueError("no images given")
    for i, image in enumerate(images):
        if not isinstance(image, str | os.PathLike | bytes | bytearray | memoryview | Image.Image | torch.Tensor):
            raise TypeError(f"image {i} is a {type(image).__name__}; images must be {ACCEPTED}")
    check_image_files([p for p in images if isinstance(p, str | os.PathLike)])
    return images


def image_name(image, index: int) -> str:
    """How a result names the `index`-th image: its path, else its kind and index."""
    if isinstance(image, str | os.PathLike):
        return str(image)
    kind = "bytes" if isinstance(image, bytes | bytearray | memoryview) else \
        "PIL" if isinstance(image, Image.Image) else "tensor"
    return f"<{kind} {index}>"
