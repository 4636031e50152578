"""The Table 2 comparison of two runs: Markdown and JSON tables and PNG plots.

Input is what `grr eval` computes for each run (`grr_train.eval.evaluate.evaluate_run`) and the
runs' `metrics.jsonl` logs. A report has one or more sections (the paper's Table 2 has one
per dataset); each lists the paper's three metrics, then the recall and caption-quality
rows the paper does not report, as (metric, A, B, % change), the change being
(B - A) / A. Plots: training and validation curves of both runs, and recall bars.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from grr_data.format.manifest import Manifest  # noqa: E402
from grr_data.infra.files import publish, write_text_atomic  # noqa: E402
from grr_train.eval.evaluate import evaluate_run  # noqa: E402
from grr_train.infer.captioning import decode_words_for  # noqa: E402
from grr_train.runs.checkpoint import resolve_checkpoint  # noqa: E402
from grr_train.runs.metrics import read_metrics  # noqa: E402

# (row label, key path in an eval result, number format); lower is better for the first three.
ROWS = [
    ("CoCa Loss", ("loss",), "{:.4f}"),
    ("Perplexity", ("perplexity",), "{:.4f}"),
    ("Contrastive Loss", ("contrastive",), "{:.4f}"),
    ("Image-to-text R@1 (%)", ("retrieval", "i2t_r1"), "{:.2f}"),
    ("Image-to-text R@5 (%)", ("retrieval", "i2t_r5"), "{:.2f}"),
    ("Image-to-text R@10 (%)", ("retrieval", "i2t_r10"), "{:.2f}"),
    ("Text-to-image R@1 (%)", ("retrieval", "t2i_r1"), "{:.2f}"),
    ("Text-to-image R@5 (%)", ("retrieval", "t2i_r5"), "{:.2f}"),
    ("Text-to-image R@10 (%)", ("retrieval", "t2i_r10"), "{:.2f}"),
    ("BLEU-4", ("captioning", "bleu4"), "{:.4f}"),
    ("CIDEr-D", ("captioning", "cider"), "{:.4f}"),
    ("Exact-match captions", ("captioning", "exact_match"), "{:.1%}"),
]
RECALL_KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]


@dataclass
class Section:
    """One block of the table: both runs evaluated on the same split."""

    title: str  # e.g. "Fine-Tuning: ROCO val"
    eval_a: dict
    eval_b: dict
    run_a: str | None = None  # run folders whose metrics.jsonl is plotted
    run_b: str | None = None
    # where eval_a/eval_b are means over seeds: the standard deviations, shaped like them
    spread_a: dict | None = None
    spread_b: dict | None = None


def _get(result: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def percent_change(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return 100.0 * (b - a) / abs(a)


def section_rows(section: Section) -> list[dict]:
    rows = []
    for label, path, fmt in ROWS:
        a, b = _get(section.eval_a, path), _get(section.eval_b, path)
        if label == "Contrastive Loss":
            size = section.eval_a.get("contrastive_batch_size")
            label = f"Contrastive Loss (batch {size})"
        row = {"metric": label, "a": a, "b": b, "change_pct": percent_change(a, b), "format": fmt}
        if section.spread_a or section.spread_b:
            row["a_sd"], row["b_sd"] = _get(section.spread_a or {}, path), _get(section.spread_b or {}, path)
        rows.append(row)
    return rows


def _fmt(value, fmt: str, sd=None) -> str:
    if value is None:
        return "n/a"
    return fmt.format(value) if sd is None else f"{fmt.format(value)} ± {fmt.format(sd)}"


def render_markdown(sections: list[Section], names: tuple[str, str]) -> str:
    lines = [f"| Metric | {names[0]} | {names[1]} | % Change |", "|---|---:|---:|---:|"]
    notes = []
    for s in sections:
        lines.append(f"| **{s.title}** | | | |")
        for row in section_rows(s):
            change = "n/a" if row["change_pct"] is None else f"{row['change_pct']:+.2f}%"
            a, b = _fmt(row["a"], row["format"], row.get("a_sd")), _fmt(row["b"], row["format"], row.get("b_sd"))
            lines.append(f"| {row['metric']} | {a} | {b} | {change} |")
        for name, ev in zip(names, (s.eval_a, s.eval_b), strict=True):
            cap = ev.get("captioning") or {}
            notes.append(
                f"- {s.title}, {name}: `{ev.get('run')}` step {ev.get('checkpoint_step')}, split "
                f"`{ev.get('split')}` of `{ev.get('data')}`, {ev.get('num_samples')} samples, "
                f"{_get(ev, ('retrieval', 'num_images'))} unique images; captions: "
                f"{cap.get('decoding', 'n/a')}."
            )
    text = "\n".join(lines) + "\n\n"
    text += (
        "Losses and perplexity: lower is better; recall, BLEU-4, CIDEr-D and exact match: higher is better. "
        "% change is (B - A) / A. Recall is over unique images (an image's captions all count "
        "as correct); BLEU-4 and CIDEr-D compare greedy or beam captions with all reference "
        "captions of an image.\n\n"
    )
    weights = {s.title: (s.eval_a.get("lambda_con"), s.eval_a.get("lambda_cap")) for s in sections}
    if len(set(weights.values())) > 1:
        text += ("The sections use different loss weights, so their CoCa losses cannot be compared with each "
                 "other (only within a section): " + "; ".join(
                     f"{title}: lambda_con {con:g}, lambda_cap {cap:g}" for title, (con, cap) in weights.items())
                 + ".\n\n")
    return text + "\n".join(notes) + "\n"


def report_json(sections: list[Section], names: tuple[str, str]) -> dict:
    return {
        "names": list(names),
        "sections": [
            {
                "title": s.title,
                "rows": [{k: v for k, v in r.items() if k != "format"} for r in section_rows(s)],
                "eval_a": s.eval_a,
                "eval_b": s.eval_b,
            }
            for s in sections
        ],
    }


def find_metrics(run_or_ckpt: str | os.PathLike) -> Path | None:
    """The metrics.jsonl of a run folder, or of the run a checkpoint folder lies in."""
    path = Path(run_or_ckpt)
    for folder in (path, *list(path.parents)[:3]):
        if (folder / "metrics.jsonl").is_file():
            return folder / "metrics.jsonl"
    return None


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(section: Section, names: tuple[str, str], path: Path) -> bool:
    """Training loss and validation loss, perplexity and contrastive loss of both runs."""
    logs = []
    for run in (section.run_a, section.run_b):
        metrics = find_metrics(run) if run else None
        logs.append(read_metrics(metrics) if metrics else [])
    if not any(logs):
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        (axes[0, 0], "train", "loss", "training CoCa loss (smoothed)", "CoCa loss"),
        (axes[0, 1], "val", "loss", "validation CoCa loss", "CoCa loss"),
        (axes[1, 0], "val", "perplexity", "validation perplexity", "perplexity (per caption token)"),
        (axes[1, 1], "val", "contrastive", "validation contrastive loss", "contrastive loss"),
    ]
    for ax, kind, key, title, ylabel in panels:
        for name, records, color in zip(names, logs, ("tab:blue", "tab:orange"), strict=True):
            points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            if kind == "train":
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(list(values), max(1, len(values) // 20)), color=color, label=name)
            else:
                ax.plot(steps, values, marker="o" if len(points) <= 30 else None, color=color, label=name)
        for records, color in zip(logs, ("tab:blue", "tab:orange"), strict=True):
            _mark_events(ax, records, color)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if any(_events(records) for records in logs):
        fig.suptitle(f"{section.title}\n(dashed: learning-rate drop, solid: early stop, dotted: best validation step)")
    else:
        fig.suptitle(section.title)
    fig.tight_layout()
    _save(fig, path)
    return True


# early stopping's events in metrics.jsonl -> line style on the curves
_EVENT_STYLES = {"early_stop_reset": "--", "early_stop_stop": "-"}


def _events(records: list[dict]) -> list[tuple[int, str]]:
    """(step, line style) of each learning-rate drop and early stop, and the best validation step."""
    marks = [(r["step"], _EVENT_STYLES[r["what"]]) for r in records
             if r.get("kind") == "event" and r.get("what") in _EVENT_STYLES]
    improved = [r["step"] for r in records if r.get("kind") == "event" and r.get("what") == "early_stop_improved"]
    if improved:
        marks.append((improved[-1], ":"))
    return marks


def _mark_events(ax, records: list[dict], color: str) -> None:
    for step, style in _events(records):
        ax.axvline(step, color=color, linestyle=style, linewidth=1.0, alpha=0.7)


def plot_recall(section: Section, names: tuple[str, str], path: Path) -> bool:
    values = [[_get(ev, ("retrieval", k)) for k in RECALL_KEYS] for ev in (section.eval_a, section.eval_b)]
    if any(v is None for row in values for v in row):
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    xs = range(len(RECALL_KEYS))
    for i, (name, row, color) in enumerate(zip(names, values, ("tab:blue", "tab:orange"), strict=True)):
        bars = ax.bar([x + (i - 0.5) * width for x in xs], row, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(xs), ["I->T R@1", "I->T R@5", "I->T R@10", "T->I R@1", "T->I R@5", "T->I R@10"])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, max(100.0, max(max(r) for r in values)) * 1.2)  # room for the legend
    num_images = _get(section.eval_a, ("retrieval", "num_images"))
    num_texts = _get(section.eval_a, ("retrieval", "num_texts"))
    ax.set_title(f"{section.title}: retrieval over {num_images} images, {num_texts} captions")
    ax.legend(loc="upper center", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    publish(tmp, path)


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def write_report(
    sections: list[Section], out_dir: str | os.PathLike, names: tuple[str, str] = ("Baseline CoCa", "GRR-CoCa"),
    preface: str = "",
) -> dict:
    """Write `comparison.md` (after `preface`, Markdown), `comparison.json` and the plots;
    returns {what: path}."""
    if not sections:
        raise ValueError("a comparison needs at least one section")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json"}
    _write_text(paths["markdown"], preface + render_markdown(sections, names))
    _write_text(paths["json"], json.dumps(report_json(sections, names), indent=2) + "\n")
    for s in sections:
        name = slug(s.title)
        if plot_curves(s, names, out / f"curves-{name}.png"):
            paths[f"curves-{name}"] = out / f"curves-{name}.png"
        if plot_recall(s, names, out / f"recall-{name}.png"):
            paths[f"recall-{name}"] = out / f"recall-{name}.png"
    return {k: str(v) for k, v in paths.items()}


def compare_runs(
    run_a: str | os.PathLike, run_b: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
    split: str = "val", title: str | None = None, names: tuple[str | None, str | None] = (None, None),
    contrastive_batch_size: int | None = None, tokenizer: str | os.PathLike | None = None, **eval_kwargs,
) -> dict:
    """Evaluate both runs on the same split (and contrastive batch size) and write the report.

    Both runs, the set and its split are checked before either run is evaluated, so a typo in
    the second run costs nothing. `names` default to the runs' folder names; captions are
    decoded with `tokenizer`, else run A's (see `grr_train.infer.captioning.decode_words_for`)."""
    for run in (run_a, run_b):
        resolve_checkpoint(run)
    manifest = Manifest.read(data_dir)  # read once, passed down
    manifest.num_samples(split)
    names = (names[0] or Path(run_a).resolve().name, names[1] or Path(run_b).resolve().name)
    decode_words = decode_words_for(run_a, tokenizer, manifest)
    eval_a = evaluate_run(run_a, manifest, split, contrastive_batch_size=contrastive_batch_size,
                          decode_words=decode_words, **eval_kwargs)
    # B gets A's contrastive batch size, so the two contrastive losses are comparable
    eval_b = evaluate_run(run_b, manifest, split, contrastive_batch_size=eval_a["contrastive_batch_size"],
                          decode_words=decode_words, **eval_kwargs)
    section = Section(title or f"{Path(data_dir).name}: {split}", eval_a, eval_b, str(run_a), str(run_b))
    return write_report([section], out_dir, names)
