"""`grr caption`, `grr embed` and `grr classify`: parse, call grr_train.api, print."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from grr_cli.groups import app

MODEL_HELP = "Run folder, checkpoint folder, `grr export` folder, or the hub id of an export."
IMAGES_HELP = "Image files or folders (a folder: its image files, sorted by name)."
DEVICE_HELP = "cpu, cuda, cuda:N, or auto (a GPU when there is one)."
TOKENIZER_HELP = "Tokenizer name or folder (default: the one the model was trained with)."
JSON_HELP = "Print the results as JSON."


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


def _load(ckpt: Path, device: str, tokenizer: Path | None):
    import grr_train.api as grr

    return grr.load(ckpt, device=device, tokenizer=tokenizer)


def _images(paths: list[Path]) -> list[Path]:
    from grr_train.api import image_paths

    return image_paths(paths)


@app.command()
def caption(
    images: list[Path] = typer.Argument(..., help=IMAGES_HELP),
    ckpt: Path = typer.Option(..., help=MODEL_HELP),
    beams: int = typer.Option(1, help="Beam search with this many beams (1: greedy)."),
    top_p: float = typer.Option(None, help="Sample from the smallest token set holding this probability."),
    top_k: int = typer.Option(None, help="Sample from the k most likely tokens."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    max_len: int = typer.Option(30, help="Longest caption, in tokens."),
    min_len: int = typer.Option(1, help="Shortest caption, in tokens (EOS is suppressed before)."),
    seed: int = typer.Option(None, help="Sampling seed."),
    batch_size: int = typer.Option(32, help="Images read and captioned at a time (memory, not the captions)."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_: bool = typer.Option(False, "--json", metavar="", help=JSON_HELP),
) -> None:
    """Caption images: greedy by default, beam search or top-k / top-p sampling."""
    from grr_train.infer.generate import DecodeOptions

    try:
        options = DecodeOptions(beams=beams, top_k=top_k, top_p=top_p, temperature=temperature,
                                min_len=min_len, max_len=max_len, seed=seed)
        options.check()  # before the model is loaded
        files = _images(images)
        model = _load(ckpt, device, tokenizer)
        captions = model.caption(files, beams=beams, top_k=top_k, top_p=top_p, temperature=temperature,
                                 min_len=min_len, max_len=max_len, seed=seed, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    if json_:
        typer.echo(json.dumps([{"image": str(p), "caption": c} for p, c in zip(files, captions, strict=True)]))
        return
    for path, text in zip(files, captions, strict=True):
        typer.echo(f"{path}: {text}")


@app.command()
def embed(
    images: list[Path] = typer.Argument(None, help=IMAGES_HELP),
    ckpt: Path = typer.Option(..., help=MODEL_HELP),
    text: list[str] = typer.Option(None, "--text", help="A text to embed (repeatable)."),
    texts_file: Path = typer.Option(None, help="A file of texts to embed, one per line."),
    out: Path = typer.Option(None, help="Write the embeddings here: .npy (one kind), .npz or .jsonl; "
                                        "default: print them."),
    batch_size: int = typer.Option(32, help="Images embedded at a time."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_: bool = typer.Option(False, "--json", metavar="", help="Print JSON lines: kind, input, embedding."),
) -> None:
    """L2-normalised embeddings of images and texts, as the contrastive loss compares them."""
    from grr_train.infer.embeddings_file import check_embeddings_path, embedding_rows, write_embeddings

    try:
        texts = list(text or [])
        if texts_file is not None:
            texts += [line for line in texts_file.read_text().splitlines() if line.strip()]
        if not images and not texts:
            raise ValueError("nothing to embed: give image files or folders, --text or --texts-file")
        if out is not None:
            check_embeddings_path(out, bool(images), bool(texts))
        files = _images(images) if images else []
        model = _load(ckpt, device, tokenizer)
        image_embeds = model.embed_images(files, batch_size=batch_size) if files else None
        text_embeds = model.embed_texts(texts) if texts else None
        if out is not None:
            write_embeddings(out, files, image_embeds, texts, text_embeds)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    if out is not None:
        typer.echo(f"wrote {len(files)} image and {len(texts)} text embeddings "
                   f"({model.model.cfg.width} numbers each) to {out}")
        return
    for row in embedding_rows(files, image_embeds, texts, text_embeds):
        typer.echo(json.dumps(row) if json_ else f"{row['kind']}\t{row['input']}\t"
                   + " ".join(f"{v:.6g}" for v in row["embedding"]))


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help=IMAGES_HELP),
    ckpt: Path = typer.Option(..., help=MODEL_HELP),
    label: list[str] = typer.Option(..., "--label", help="A class name (repeatable; at least two)."),
    template: str = typer.Option("a photo of a {}.", help="The prompt; {} stands for the class name."),
    batch_size: int = typer.Option(32, help="Images embedded at a time."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_: bool = typer.Option(False, "--json", metavar="", help=JSON_HELP + " (every class's probability)"),
) -> None:
    """Zero-shot classification: each image's most likely label, softmax over cosine similarity / temperature."""
    try:
        if "{}" not in template:
            raise ValueError(f"--template {template!r} has no {{}} for the class name")
        files = _images(images)
        model = _load(ckpt, device, tokenizer)
        predictions = model.classify(files, label, template=template, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    if json_:
        typer.echo(json.dumps([{"image": p.image, "label": p.label, "score": p.score, "probs": p.probs}
                               for p in predictions]))
        return
    for p in predictions:
        typer.echo(f"{p.image}: {p.label} ({p.score:.3f})")
