"""`grr eval`: a checkpoint's Table 2 metrics on a split, plus retrieval and caption quality.

One pass over the split: each batch is decoded once and goes through the model once, and its
outputs feed every metric. Each usable sample counts once (the loader repeats a few samples to
fill its last batch and replaces unusable ones; each batch's `real` mask says which to keep).

- `grr_train.train.validate.validate`: CoCa loss with the run's own lambdas, perplexity over the
  split, and contrastive loss over chunks of a stated batch size (the paper's metrics).
- Retrieval and captioning, from the same forward pass (its image and text embeddings and its
  image tokens). Samples are grouped by image through a SHA-1 of the decoded, normalised image
  tensor: captions of one image share its JPEG, hence its decoded pixels, so this needs nothing
  beyond the loader contract and also merges exact duplicate images (which are, for retrieval,
  the same image). Image-to-text and text-to-image recall@1/5/10 run over unique images
  (`grr_train.eval.retrieval`). One caption is generated per unique image from its image tokens
  (greedy by default, over the KV cache; the batch's new images together) and scored with
  BLEU-4 and CIDEr-D against all of that image's reference captions (`grr_train.eval.caption_metrics`).

Precision: the pass runs under the autocast the run trained (and validated) with, unless told
otherwise: `precision="auto"` takes the run's `precision` setting (its config.json) and
resolves it as training does (its own "auto": bf16 on a GPU, fp32 on the CPU); the result
records the precision used.

Captions need the set's tokenizer to become text; the caller passes its `decode_words`
(`grr_train.infer.captioning.decode_words_for`), and without one captioning is left out.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable, Iterator

import torch

from grr_data.format.layout import caption_word_ids
from grr_data.format.manifest import Manifest
from grr_data.infra.progress import progress
from grr_data.loader import make_loader
from grr_train.eval.caption_metrics import caption_scores
from grr_train.eval.retrieval import group_by_image, recall_at_k
from grr_train.infer.generate import DecodeOptions, generate_from_tokens
from grr_train.runs.weights import load_model
from grr_train.runtime.precision import autocast_dtype
from grr_train.train.config import PRECISIONS
from grr_train.train.setup import check_same_tokenizer
from grr_train.train.validate import validate

NUM_EXAMPLES = 5


class RealSamples:
    """Iterates a loader, keeping only each batch's real samples (its `real` mask: the loader
    pads its last batch with repeats and replaces unusable samples) and stopping after
    `max_samples`. Yielded batches hold real samples only (their `real` is all True)."""

    def __init__(self, loader, max_samples: int | None = None, desc: str = "eval"):
        self.loader, self.max_samples, self.desc = loader, max_samples, desc

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        left = self.max_samples if self.max_samples is not None else math.inf
        with progress(total=len(self.loader), desc=self.desc, unit="batch", leave=False) as bar:
            for batch in self.loader:
                bar.update(1)
                rows = batch["real"].nonzero()[:, 0][: int(min(batch["real"].sum(), left))].tolist()
                if rows:
                    yield {"images": batch["images"][rows], "ids": batch["ids"][rows],
                           "keys": [batch["keys"][i] for i in rows], "real": torch.ones(len(rows), dtype=torch.bool)}
                left -= len(rows)
                if left <= 0:
                    break


def resolve_precision(precision: str, train_cfg: dict, device: str) -> str:
    """"fp32" or "bf16": `precision` (auto, fp32, bf16), where auto is the run's own setting,
    resolved as the trainer does (`grr_train.runtime.precision`: its auto is bf16 on a GPU, fp32 on the CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = str(train_cfg.get("precision", "auto"))
    return "bf16" if autocast_dtype(precision, device) == torch.bfloat16 else "fp32"


def image_hash(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class RetrievalAndCaptions:
    """Collects, batch by batch, what recall@k and caption scores need: a text embedding per
    sample, an image embedding and a generated caption per unique image, the reference captions
    of each image."""

    def __init__(self, model, special, decode_words: Callable | None, options: DecodeOptions | None):
        self.model, self.special, self.decode_words, self.options = model, special, decode_words, options
        self.image_embeds: list[torch.Tensor] = []
        self.text_embeds: list[torch.Tensor] = []
        self.image_keys: list[str] = []  # per sample: the hash of its image
        self.references: dict[str, list[str]] = {}
        self.generated: dict[str, str] = {}
        self.first_key: dict[str, str] = {}  # per image: the key of its first sample

    def add(self, images, ids, keys: list[str], image_embed, text_embed, image_tokens) -> None:
        """One batch of real samples: images (B, 3, S, S), ids (B, 65), and the model's outputs
        for them: embeddings (B, D), image tokens (B, Q, D)."""
        hashes = [image_hash(img) for img in images]
        new = [i for i, h in enumerate(hashes) if h not in self.first_key and h not in hashes[:i]]
        self.text_embeds.append(text_embed.float().cpu())
        self.image_keys.extend(hashes)
        if new:
            self.image_embeds.append(image_embed[new].float().cpu())
            for i in new:
                self.first_key[hashes[i]] = keys[i]
            if self.decode_words is not None and self.options is not None:
                captions = generate_from_tokens(self.model, image_tokens[new], self.special, self.options)
                for i, words in zip(new, captions, strict=True):
                    self.generated[hashes[i]] = self.decode_words(words)
        if self.decode_words is not None:
            for h, row in zip(hashes, ids.tolist(), strict=True):
                self.references.setdefault(h, []).append(self.decode_words(caption_word_ids(row, self.special)))

    def results(self) -> tuple[dict, dict | None]:
        """Recall@k over unique images, and caption scores (None when no caption was generated)."""
        text_to_image, _ = group_by_image(self.image_keys)
        retrieval = recall_at_k(torch.cat(self.image_embeds), torch.cat(self.text_embeds), text_to_image)
        if not self.generated:
            return retrieval, None
        order = list(self.generated)
        captioning = caption_scores([self.generated[h] for h in order], [self.references[h] for h in order])
        captioning["decoding"] = self.options.describe()
        captioning["tokenization"] = "lower case, COCO punctuation removed, whitespace split"
        captioning["captions"] = [
            {"key": self.first_key[h], "generated": self.generated[h], "references": self.references[h]}
            for h in order
        ]
        captioning["examples"] = captioning["captions"][:NUM_EXAMPLES]
        return retrieval, captioning


class _OnePass(torch.nn.Module):
    """The model as `validate` calls it, also handing each batch's outputs to `collector`: the
    embeddings and the image tokens from its output, the keys from `batches`, which tags each
    batch as `validate` takes it."""

    def __init__(self, model, collector: RetrievalAndCaptions):
        super().__init__()
        self.model, self.collector = model, collector
        self.keys: list[str] = []

    def batches(self, samples: RealSamples) -> Iterator[dict]:
        for batch in samples:
            self.keys = batch["keys"]
            yield batch

    def forward(self, images, ids):
        out = self.model(images, ids)
        self.collector.add(images, ids, self.keys, out.image_embed, out.text_embed, out.image_tokens)
        return out


def evaluate_run(
    run_or_ckpt: str | os.PathLike,
    data: Manifest | str | os.PathLike,
    split: str = "val",
    batch_size: int = 32,
    contrastive_batch_size: int | None = None,
    max_samples: int | None = None,
    decode_words: Callable | None = None,
    decode_options: DecodeOptions | None = None,
    device: str = "cpu",
    loader_kind: str = "auto",
    num_workers: int = 2,
    precision: str = "auto",
    allow_other_tokenizer: bool = False,
) -> dict:
    """Every number `grr eval` reports, as one JSON-ready dict; `precision`: auto (the run's
    training precision), fp32 or bf16 (autocast). A set sharded with another tokenizer than the
    run's (by fingerprint) is refused unless `allow_other_tokenizer`."""
    model, info = load_model(run_or_ckpt, device=device)
    train_cfg = info["train_config"]
    precision = resolve_precision(precision, train_cfg, device)
    manifest = Manifest.of(data)
    size = manifest.num_samples(split)
    num_samples = min(size, max_samples) if max_samples is not None else size
    whose = "asked for"
    if contrastive_batch_size is None:
        contrastive_batch_size, whose = int(train_cfg.get("val_contrastive_batch_size", 192)), "the run's validation one"
    if contrastive_batch_size < 1 or num_samples < 1:
        raise ValueError(f"contrastive batch size {contrastive_batch_size} and {num_samples} samples evaluated from "
                         f"split {split!r} of {manifest.root}: both must be at least 1")
    if contrastive_batch_size > num_samples:  # capped, as training caps its batches on a small set
        print(f"warning: contrastive batch {contrastive_batch_size} ({whose}) is more than the {num_samples} samples "
              f"evaluated from split {split!r} of {manifest.root}: using {num_samples} (a contrastive loss over "
              f"another batch size is not comparable)", file=sys.stderr)
        contrastive_batch_size = num_samples
    decode_options = decode_options or DecodeOptions()
    decode_options.check()

    lambda_con, lambda_cap = float(train_cfg["lambda_con"]), float(train_cfg["lambda_cap"])
    temperature = float(info["model_config"].temperature)
    loader = make_loader(manifest, split=split, batch_size=batch_size, kind=loader_kind, shuffle=False,
                         num_workers=num_workers, device=device, with_keys=True)
    if loader.special != info["special"]:
        raise ValueError(f"{manifest.root} was tokenized with special ids {loader.special}, the model was trained with "
                         f"{info['special']}: evaluate on a set sharded with the run's tokenizer")
    check_same_tokenizer(info.get("tokenizer"), manifest, f"the run {run_or_ckpt}",
                         allow_other_tokenizer)
    collector = RetrievalAndCaptions(model, info["special"], decode_words, decode_options)
    one_pass = _OnePass(model, collector)
    paper = validate(one_pass, one_pass.batches(RealSamples(loader, max_samples, f"{split}: eval")),
                     special=info["special"], lambda_con=lambda_con, lambda_cap=lambda_cap,
                     temperature=temperature, contrastive_batch_size=contrastive_batch_size,
                     autocast_dtype=autocast_dtype(precision, device))
    retrieval, captioning = collector.results()
    return {
        "run": str(run_or_ckpt),
        "checkpoint": str(info["checkpoint"]),
        "checkpoint_step": info["step"],
        "data": str(manifest.root),
        "split": split,
        "batch_size": batch_size,
        "max_samples": max_samples,
        "precision": precision,
        "lambda_con": lambda_con,
        "lambda_cap": lambda_cap,
        "temperature": temperature,
        **paper,
        "retrieval": retrieval,
        "captioning": captioning,
        "skipped": dict(loader.skipped),
    }


def format_eval(result: dict) -> str:
    """A readable table of an eval result."""
    cap = result.get("captioning")
    ret = result["retrieval"]
    rows = [
        ("checkpoint", f"{result['checkpoint']} (step {result['checkpoint_step']})"),
        ("precision", result.get("precision", "fp32")),
        ("data", f"{result['data']} split {result['split']}: {result['num_samples']} samples, "
                 f"{ret['num_images']} unique images"),
        ("CoCa loss", f"{result['loss']:.4f}  (lambda_con {result['lambda_con']:g}, lambda_cap {result['lambda_cap']:g})"),
        ("perplexity", f"{result['perplexity']:.4f}  ({result['num_tokens']} tokens)"),
        ("caption loss", f"{result['caption']:.4f}"),
        ("contrastive loss", f"{result['contrastive']:.4f}  (batch {result['contrastive_batch_size']}, "
                             f"{result['num_contrastive_dropped']} samples in a short last chunk left out)"),
        ("image->text R@1/5/10", f"{ret['i2t_r1']:.2f} / {ret['i2t_r5']:.2f} / {ret['i2t_r10']:.2f} %"),
        ("text->image R@1/5/10", f"{ret['t2i_r1']:.2f} / {ret['t2i_r5']:.2f} / {ret['t2i_r10']:.2f} %"),
    ]
    if cap:
        rows += [("BLEU-4", f"{cap['bleu4']:.4f}  ({cap['decoding']})"), ("CIDEr-D", f"{cap['cider']:.4f}"),
                 ("exact-match captions", f"{cap['exact_match']:.1%}")]
    else:
        rows.append(("captions", "not scored (no tokenizer given)"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    for ex in (cap or {}).get("examples", [])[:3]:
        lines.append(f"  {ex['key']}: {ex['generated']!r}  (reference: {ex['references'][0]!r})")
    return "\n".join(lines)
