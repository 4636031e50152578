"""README.md of an export (its model card): what the model is, what it was trained on and for how
long, the run's validation figures, how to load it, its licence and the paper to cite.

The card is published with the weights, so it names no local path: data, `--from` runs and
tokenizer folders appear as their last two path parts (`roco/shards`), in the table and in the
training config it reproduces.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath

from grr_data.format.manifest import Manifest
from grr_train.runs.metrics import read_metrics

LICENSE = "apache-2.0"
TAGS = ["coca", "grr-coca", "image-captioning", "image-text-retrieval", "zero-shot-image-classification"]
PAPER = "arXiv 2507.18009"
CITATION = """\
@misc{grrcoca2025,
  title         = {GRR-CoCa: Leveraging LLM Mechanisms in Multimodal Model Architectures},
  year          = {2025},
  eprint        = {2507.18009},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2507.18009}
}"""
# What the code in the export imports (torch, numpy, PIL, transformers) and what T5's tokenizer reads with.
INSTALL_TRANSFORMERS = 'pip install torch "transformers>=5,<6" sentencepiece protobuf pillow'
PATH_SETTINGS = ("data", "init_from")  # the training settings that hold local paths


def public_path(path: str | None) -> str | None:
    """A local path as the card shows it: its last two parts (`/home/me/data/roco/shards` -> `roco/shards`)."""
    if path is None:
        return None
    parts = [p for p in PurePath(str(path)).parts if p not in ("/", "\\", ".", "..")]
    return "/".join(parts[-2:]) if parts else str(path)


def public_tokenizer_name(name: str | None) -> str | None:
    """A tokenizer's recorded name: hub names and the sample's as they are, a local folder as `public_path`."""
    if name is None or not (str(name).startswith(("/", ".", "~")) or Path(str(name)).is_absolute()):
        return name
    return public_path(name)


def model_card(num_params: int, meta: dict, tokenizer: dict, source: dict, run_dir: Path | None) -> str:
    """The card of an export of the checkpoint `meta` (its meta.json) from `run_dir` (None: a loose checkpoint)."""
    train = meta["train_config"]
    model = meta["model_config"]
    preset = source["preset"]  # its architecture's preset: older fine-tuned runs recorded the default, grr-coca
    title = f"{source['run'] or 'grr run'} ({preset})"
    lines = [
        "---", "library_name: grr-coca", f"license: {LICENSE}", "pipeline_tag: image-to-text", "tags:",
        *[f"- {t}" for t in TAGS], "---", "",
        f"# {title}", "",
        "A CoCa (Contrastive Captioner) image-text model trained with grr, the open reproduction of GRR-CoCa "
        f"({PAPER}): image and text embeddings for retrieval and zero-shot classification, and captions.", "",
        "| | |", "|---|---|",
        f"| preset | `{preset}`: ViT with {_vit(model)}; width {model['width']}, {model['depth']} ViT blocks, "
        f"{model['text_depth']} + {model['multimodal_depth']} text decoder blocks, {model['image_size']}-px images |",
        f"| parameters | {num_params:,} |",
        f"| data | {_data(train)} |",
        f"| steps | {_steps(train, source)} |",
        f"| recipe | {_recipe(train)} |",
        f"| tokenizer | `{public_tokenizer_name(tokenizer.get('name'))}`, vocabulary {tokenizer.get('vocab_size')} "
        "(its files are in this folder) |",
        f"| weights | `{source['checkpoint']}` of the run, step {source['step']} |", "",
        "## Evaluation", "",
        *_evaluation_lines(run_dir, source["step"]), "",
        "## Use", "",
        "With transformers alone (the model's code is in this folder, so grr need not be installed):", "",
        "```bash", INSTALL_TRANSFORMERS, "```", "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        'model = AutoModel.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        'pixels = model.preprocess(["photo.jpg"])  # grr\'s own resize and normalisation',
        "image = model.get_image_features(pixels)  # L2-normalised",
        'text = model.get_text_features(**tokenizer(["a photo of a dog"], padding=True, return_tensors="pt"))',
        "print(tokenizer.batch_decode(model.generate_captions(pixels, num_beams=3), skip_special_tokens=True))",
        "```", "",
        "With grr (the `grr-coca` distribution: `pip install .` in a clone of its repository):", "",
        "```python",
        "import grr_train.api as grr",
        'model = grr.load("path/to/this/folder")',
        'print(model.caption(["photo.jpg"]))',
        "model, _, preprocess = grr.create_model_and_transforms(\"path/to/this/folder\")  # open_clip's shape",
        "```", "",
        "or from the shell: `grr caption photo.jpg --ckpt path/to/this/folder`.", "",
        "## Licence", "",
        "Apache-2.0, as grr. The data the model was trained on has licences of its own.", "",
        "## Citation", "",
        "```bibtex", CITATION, "```", "",
        "## Training config", "",
        "```json", json.dumps(_public_config(train), indent=2, sort_keys=True), "```", "",
    ]
    return "\n".join(lines)


def _vit(model: dict) -> str:
    return f"{model['vit_norm']}, {model['vit_ffn']} feed-forward, {model['vit_pos']} positions"


def _data(train: dict) -> str:
    data = public_path(train.get("data"))
    named = f"{train['dataset']} (`{data}`)" if train.get("dataset") else f"`{data}`"
    try:
        info = Manifest.read(train["data"])
        counts = ", ".join(f"{name} {n:,}" for name, n in info.split_sizes.items() if n)
        return f"{named}: {counts} image-caption pairs"
    except (ValueError, OSError):  # the set is not on this machine, or unreadable: its name is what the card says
        return named


def _steps(train: dict, source: dict) -> str:
    samples = source["step"] * train.get("global_batch_size", 0)
    return (f"{source['step']:,} optimizer steps of {train.get('global_batch_size')} pairs ({samples:,} pairs seen), "
            f"epoch {source['epoch']}")


def _recipe(train: dict) -> str:
    recipe = train.get("recipe", "?")
    if train.get("init_from"):
        recipe += f" from `{public_path(train['init_from'])}`"
    return (f"{recipe}: lr {train.get('lr_max')} -> {train.get('lr_min')}, warmup {train.get('warmup_steps')} steps, "
            f"dropout {train.get('dropout')}, precision {train.get('precision')}")


def _public_config(train: dict) -> dict:
    return {k: public_path(v) if k in PATH_SETTINGS and v is not None else v for k, v in train.items()}


def _numbers(record: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                     if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "time", "epoch"))


def _evaluation_lines(run_dir: Path | None, step: int) -> list[str]:
    """The run's validation at the exported step (else the last before it), its best, and its last training record."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return ["Not known: the checkpoint was exported without its run folder."]
    records = [r for r in read_metrics(run_dir) if r.get("step") is not None and r["step"] <= step]
    val = [r for r in records if r.get("kind") == "val"]
    train = [r for r in records if r.get("kind") == "train"]
    lines = ["| | split | step | figures |", "|---|---|---|---|"]
    if val:
        lines.append(f"| validation at these weights | {val[-1].get('split')} | {val[-1]['step']} | {_numbers(val[-1])} |")
        best = min(val, key=lambda r: r.get("loss", float("inf")))
        if best is not val[-1]:
            lines.append(f"| best validation loss | {best.get('split')} | {best['step']} | {_numbers(best)} |")
    if train:
        lines.append(f"| last training step | train | {train[-1]['step']} | {_numbers(train[-1])} |")
    if len(lines) == 2:
        return ["The run logged no training or validation figures up to these weights."]
    if not val:
        lines.append("")
        lines.append("The run was not validated (`val_split` none, or it stopped before a validation); "
                     "`grr eval` measures it on a sharded set.")
    return lines
