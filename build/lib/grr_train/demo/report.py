"""What `grr demo` adds to the Table 2 report: a preface that says what the numbers can and
cannot show, exact match by scene kind, the mean and spread over seeds, and a grid of example
images with the captions both models gave them."""

from __future__ import annotations

import io
import statistics
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from PIL import Image  # noqa: E402

from grr_data.infra.files import publish  # noqa: E402
from grr_train.eval.caption_metrics import tokenize  # noqa: E402

SCENE_KINDS = ("one object", "two objects", "a count")
CAPTION_CHARS = 46  # what fits under one image of the example grid at its font size


def scene_kind(caption: str) -> str:
    """The shapes set's scene kind from its caption's words (see manifests/shapes.json)."""
    words = tokenize(caption)
    if words and words[0] in ("two", "three", "four"):
        return "a count"
    return "two objects" if "left" in words or "above" in words else "one object"


def exact_by_kind(eval_result: dict) -> dict[str, tuple[int, int]]:
    """{scene kind: (exact captions, images)} from an eval result's captions."""
    hits, totals = Counter(), Counter()
    for c in (eval_result.get("captioning") or {}).get("captions", []):
        kind = scene_kind(c["references"][0])
        totals[kind] += 1
        hits[kind] += tokenize(c["generated"]) in [tokenize(r) for r in c["references"]]
    return {k: (hits[k], totals[k]) for k in SCENE_KINDS if totals[k]}


def _numbers(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def mean_eval(results: list[dict]) -> tuple[dict, dict]:
    """The mean of several eval results (one per seed) and the standard deviation of every
    number in them; other fields come from the first. One result: itself, no spread."""
    if len(results) == 1:
        return results[0], {}

    def merge(items: list):
        first = items[0]
        if isinstance(first, dict):
            keys = [k for k in first if all(isinstance(r, dict) and k in r for r in items)]
            pairs = {k: merge([r[k] for r in items]) for k in keys}
            return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items() if v[1] not in ({}, None)}
        if _numbers(items):
            return statistics.fmean(items), statistics.stdev(items)
        return first, None

    return merge(results)


def preface(*, num_pairs: int, splits: dict[str, int], pretrain_steps: int, finetune_steps: int, batch_size: int,
            seeds: list[int], minutes: float, grid: str | None, kinds: dict[str, dict[str, tuple[int, int]]],
            parameters: tuple[int, int] = (0, 0), device: str = "cpu",
            presets: tuple[str, str] = ("baseline-tiny-p16", "grr-tiny-p16")) -> str:
    """The report's opening: what was run, what it can and cannot show, and exact match by kind."""
    val, test = splits.get("val", 0), splits.get("test", 0)
    seed_text = (f"one seed ({seeds[0]}): a difference between the models smaller than the spread between "
                 "seeds (run `grr demo --seeds 3` to see it) is noise"
                 if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); each number is "
                 "their mean, with the standard deviation beside it")
    lines = [
        "# grr demo: Baseline CoCa against GRR-CoCa on the shapes set\n",
        f"Two models ({presets[0]} and {presets[1]}: {parameters[0]:,} and {parameters[1]:,} parameters) trained "
        f"on {'the CPU' if device == 'cpu' else device} for {minutes:.0f} minutes in all on "
        f"{splits.get('train', 0)} synthetic image-caption pairs (of {num_pairs} drawn): {pretrain_steps} "
        f"pretraining and at most {finetune_steps} fine-tuning steps of {batch_size} pairs, {seed_text}.\n",
        "**What these numbers can show**: that the whole pipeline learns. Captions of held-out images "
        f"of seen colour-shape pairs (the val split, {val} images) are compared word for word with the "
        f"truth (exact match); retrieval ranks each image's caption among {val} (chance R@1 "
        f"{100 / max(val, 1):.1f}%). The test split ({test} images) shows colour-shape pairs that no "
        "training image shows: how far the models compose what they learned.\n",
        "**What they cannot show**: which architecture is better at the paper's scale. Models of "
        f"{'well under a million' if max(parameters) < 1e6 else f'{max(parameters) / 1e6:.0f} million'} "
        "parameters trained for minutes on one synthetic set are not the paper's 394M-parameter "
        "models trained on CC12M and ROCO; at this size GRR-CoCa's changes (GEGLU, RMSNorm, RoPE in the "
        "ViT) may help, hurt or do nothing, and the % change column says only which run came out ahead "
        "here.\n",
    ]
    if kinds:
        lines.append("Exact-match captions by scene kind (fine-tuned models):\n")
        lines.append("| model, split | " + " | ".join(SCENE_KINDS) + " |")
        lines.append("|---|" + "---:|" * len(SCENE_KINDS))
        for label, by_kind in kinds.items():
            cells = [f"{by_kind[k][0]}/{by_kind[k][1]}" if k in by_kind else "-" for k in SCENE_KINDS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if grid:
        lines.append(f"![example captions]({Path(grid).name})\n")
    return "\n".join(lines) + "\n"


def read_images(shards: Path, split: str, keys: list[str]) -> dict[str, Image.Image]:
    """The JPEGs of `keys` from a split's shards."""
    wanted, found = set(keys), {}
    for tar_path in sorted((shards / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "jpg" and key in wanted:
                    found[key] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
        if len(found) == len(wanted):
            break
    return found


def example_grid(shards: Path, panels: list[tuple[str, str, dict, dict]], names: tuple[str, str], path: Path,
                 per_panel: int = 4) -> Path:
    """A PNG of `per_panel` images per (title, split, eval A, eval B) panel row, each with its true
    caption and both models' (green: exact, red: not)."""
    fig, axes = plt.subplots(len(panels), per_panel, figsize=(3.6 * per_panel, 5.2 * len(panels)), squeeze=False)
    for row, (title, split, eval_a, eval_b) in enumerate(panels):
        caps_a = {c["key"]: c for c in eval_a["captioning"]["captions"]}
        caps_b = {c["key"]: c["generated"] for c in eval_b["captioning"]["captions"]}
        keys = [k for k in caps_a if k in caps_b][:per_panel]
        images = read_images(shards, split, keys)
        for col in range(per_panel):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(keys):
                continue
            key = keys[col]
            ax.imshow(images[key])
            truth = caps_a[key]["references"][0]
            lines = [("truth: " + truth, "black")]
            for name, generated in ((names[0], caps_a[key]["generated"]), (names[1], caps_b[key])):
                lines.append((f"{name}: {generated}", "green" if tokenize(generated) == tokenize(truth) else "red"))
            y = -0.05
            for text, color in lines:  # wrapped to the image's width, so no caption runs into the next
                wrapped = textwrap.fill(text, CAPTION_CHARS)
                ax.text(0.0, y, wrapped, transform=ax.transAxes, fontsize=7.5, color=color, va="top")
                y -= 0.05 * (wrapped.count("\n") + 1) + 0.02
            if col == 0:
                ax.set_title(title, loc="left", fontsize=10)
    # the captions hang below each image, outside its axes: leave them room
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.13, wspace=0.08, hspace=0.55)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    publish(tmp, path)
    return path
