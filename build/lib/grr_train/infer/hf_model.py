"""A grr CoCa as a transformers model: the code an export carries so that `AutoConfig`, `AutoModel`
and `AutoTokenizer` load it where grr is not installed.

`grr export` copies this module into the export as `modeling_grr_coca.py`, with the model code it
imports (`grr_train.model`, `grr_train.infer.generate`, `grr_data.format.layout`) beside it under `grr_*.py`
names and its imports made relative (`grr_train.infer.export_code`); config.json's `auto_map` names the
two classes. In grr itself they are ordinary classes:

    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained("exports/finetune-grr", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("exports/finetune-grr")
    pixels = model.preprocess(["photo.jpg"])                  # (B, 3, 288, 288)
    image = model.get_image_features(pixels)                  # (B, D) L2-normalised
    text = model.get_text_features(**tokenizer(["a dog"], padding=True, return_tensors="pt"))
    captions = tokenizer.batch_decode(model.generate_captions(pixels, num_beams=3), skip_special_tokens=True)

The weights are the CoCa's under their grr names (no prefix), so the one `model.safetensors`
serves `grr_train.infer.export.HubCoCa` too. Text goes in as the T5 tokenizer gives it (words, then its
EOS, then padding); `get_text_features` lays it out as grr's loaders do (BOS words EOS PAD.. CLS PAD).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from grr_data.format.layout import SEQ_LEN, SpecialIds, build_layout
from grr_train.infer.generate import DecodeOptions, generate
from grr_train.model.coca import CoCa
from grr_train.model.config import ModelConfig

# What grr_data's loaders normalise with (grr_data.loader.base); tests/test_export.py checks that
# `preprocess` gives exactly the loaders' tensors.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class GrrCocaConfig(PreTrainedConfig):
    """config.json of an export: grr's model config, the layout's special ids, the tokenizer's
    record and where the weights came from (the fields `grr_train.infer.export.HubCoCa` takes)."""

    model_type = "grr_coca"

    model_config: dict | None = None
    special: dict | None = None
    tokenizer: dict | None = None
    source: dict | None = None


@dataclass
class GrrCocaOutput(ModelOutput):
    image_embeds: torch.Tensor | None = None  # (B, D) L2-normalised
    text_embeds: torch.Tensor | None = None  # (B, D) L2-normalised
    logits_per_image: torch.Tensor | None = None  # (B_images, B_texts) cosine similarity / temperature
    logits_per_text: torch.Tensor | None = None


class GrrCocaModel(PreTrainedModel):
    """The CoCa with its weights under grr's names; see the module's docstring."""

    config_class = GrrCocaConfig
    main_input_name = "pixel_values"
    _no_split_modules: list[str] = []

    def __init__(self, config: GrrCocaConfig) -> None:
        super().__init__(config)
        coca = CoCa(ModelConfig.from_dict(config.model_config))
        self.cfg = coca.cfg
        for name, module in coca.named_children():  # the CoCa's modules at the top: grr's weight names
            self.add_module(name, module)
        self._coca = (coca,)  # its methods, run on these same modules (a tuple: not a submodule)
        self.special = SpecialIds(**config.special) if config.special else SpecialIds.for_vocab(self.cfg.vocab_size)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """CoCa initialises itself when built; loading replaces every weight."""

    @property
    def coca(self) -> CoCa:
        return self._coca[0]

    def preprocess(self, images) -> torch.Tensor:
        """PIL images, image files (paths or bytes), or one of them -> (B, 3, S, S) float32 as grr's
        loaders give them: RGB, bilinear resize to S x S (aspect not kept), ImageNet mean and std."""
        if isinstance(images, Image.Image | str | os.PathLike | bytes):
            images = [images]
        size = self.cfg.image_size
        out = []
        for image in images:
            if not isinstance(image, Image.Image):
                image = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
            pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))  # (S, S, 3) uint8
            out.append(torch.from_numpy(pixels.copy()))
        batch = torch.stack(out).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S) uint8
        std, mean = torch.tensor(IMAGE_STD).view(1, 3, 1, 1), torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        return torch.addcmul(-mean / std, batch.float(), 1 / (std * 255))

    def layout_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The T5 tokenizer's ids (B, L) (its EOS and padding included or not) -> grr's layout (B, 65)."""
        special, rows = self.special, []
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        for ids, keep in zip(input_ids.tolist(), mask.tolist(), strict=True):
            words = [t for t, k in zip(ids, keep, strict=True) if k]
            while words and words[-1] in (special.eos, special.pad):
                words.pop()
            rows.append(build_layout(words, special)[0])
        return torch.tensor(rows, dtype=torch.long, device=input_ids.device).view(-1, SEQ_LEN)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) from `preprocess` -> (B, D) L2-normalised image embeddings."""
        return self.coca.encode_image(pixel_values.to(self.lm_head.weight.device))[0]

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **_ignored) -> torch.Tensor:
        """The tokenizer's ids (B, L) -> (B, D) L2-normalised text embeddings (the unimodal decoder at CLS)."""
        return self.coca.encode_text(self.layout_ids(input_ids, attention_mask).to(self.lm_head.weight.device))

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_ignored) -> GrrCocaOutput:
        """Embeddings of whichever is given; with both, their similarities / the model's temperature."""
        image = None if pixel_values is None else self.get_image_features(pixel_values)
        text = None if input_ids is None else self.get_text_features(input_ids, attention_mask)
        per_image = None if image is None or text is None else image @ text.T / self.cfg.temperature
        return GrrCocaOutput(image_embeds=image, text_embeds=text, logits_per_image=per_image,
                             logits_per_text=None if per_image is None else per_image.T)

    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor, num_beams: int = 1, max_length: int = 30,
                          min_length: int = 1, top_k: int | None = None, top_p: float | None = None,
                          temperature: float = 1.0, seed: int | None = None) -> list[list[int]]:
        """One caption's word ids per image (decode with `tokenizer.batch_decode(..., skip_special_tokens=True)`):
        greedy, `num_beams` beam search, or top-k / top-p sampling; lengths in tokens, EOS not counted."""
        options = DecodeOptions(beams=num_beams, top_k=top_k, top_p=top_p, temperature=temperature,
                                min_len=min_length, max_len=max_length, seed=seed)
        return generate(self.coca, pixel_values.to(self.lm_head.weight.device), self.special, options)
