"""`grr eval`, `grr caption`, `grr compare` and `grr demo`: parse, call grr_train, print."""

from __future__ import annotations

import json
from pathlib import Path

import typer

DEVICE_HELP = "cpu, cuda, cuda:N, or auto (a GPU when there is one)."
TOKENIZER_HELP = "Tokenizer name or folder, to turn ids into text (default: the one the run was trained with)."


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


def _manifest_tokenizer(data_dir: Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())["tokenizer"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot read the tokenizer entry ({err}); is {data_dir} a sharded set?") from err


def decode_words_for(run_or_ckpt: Path, tokenizer: Path | None = None, data_dir: Path | None = None):
    """The `decode_words` for a run's captions: `tokenizer` when given, else the one its training
    set was made with (recorded in the checkpoint), else, for runs from before that was recorded,
    the one named in `data_dir`'s manifest."""
    from grr_data.tokenizer import load_tokenizer
    from grr_train.checkpoint import read_meta, resolve_checkpoint

    meta = read_meta(resolve_checkpoint(run_or_ckpt))
    vocab_size = int(meta["special"]["vocab_size"])
    if tokenizer is not None:
        name, origin = str(tokenizer), "--tokenizer"
    elif meta.get("tokenizer"):
        name, origin = meta["tokenizer"]["name"], f"{run_or_ckpt} (recorded at training)"
    elif data_dir is not None:
        name, origin = _manifest_tokenizer(data_dir)["name"], f"{data_dir}/manifest.json"
    else:
        raise ValueError(f"{run_or_ckpt} does not record its tokenizer (an older run); pass --tokenizer")
    tok = load_tokenizer(name)
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer {name!r} (from {origin}) has {tok.vocab_size} ids but the model "
                         f"{vocab_size}; pass the tokenizer the model was trained with as --tokenizer")
    return tok.decode_words


def register(app: typer.Typer) -> None:
    """Add eval, caption, compare and demo to the root app."""
    from cli import demo

    app.command(name="eval")(eval_)
    app.command()(caption)
    app.command()(compare)
    app.command(name="demo")(demo.demo)


def eval_(
    run_or_ckpt: Path = typer.Argument(..., help="Run folder or checkpoint folder."),
    data: Path = typer.Option(..., help="Sharded set to evaluate on."),
    split: str = typer.Option("val", help="Split of the set."),
    batch_size: int = typer.Option(32, help="Loader batch size (does not change any number)."),
    contrastive_batch_size: int = typer.Option(None, help="Contrastive loss batch (default: the run's validation one)."),
    max_samples: int = typer.Option(None, help="Evaluate only the first N samples of the split."),
    beams: int = typer.Option(1, help="Beams for the scored captions (1: greedy)."),
    max_len: int = typer.Option(30, help="Longest generated caption, in tokens."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help="auto (the run's training precision: bf16 autocast on a GPU, "
                                               "fp32 on the CPU unless the run set one), fp32 or bf16."),
    json_: bool = typer.Option(False, "--json", help="Print every number as JSON."),
) -> None:
    """Table 2 metrics (CoCa loss, perplexity, contrastive loss), recall@k, BLEU-4 and CIDEr-D."""
    from grr_train.evaluate import evaluate_run, format_eval
    from grr_train.generate import DecodeOptions

    try:
        decode_words = decode_words_for(run_or_ckpt, tokenizer, data)
        result = evaluate_run(run_or_ckpt, data, split, batch_size, contrastive_batch_size, max_samples,
                              decode_words, DecodeOptions(beams=beams, max_len=max_len), pick_device(device),
                              precision=precision)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(json.dumps(result, indent=2) if json_ else format_eval(result))


def caption(
    images: list[Path] = typer.Argument(..., help="Image files."),
    ckpt: Path = typer.Option(..., help="Run folder or checkpoint folder."),
    beams: int = typer.Option(1, help="Beam search with this many beams (1: greedy)."),
    top_p: float = typer.Option(None, help="Sample from the smallest token set holding this probability."),
    top_k: int = typer.Option(None, help="Sample from the k most likely tokens."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    max_len: int = typer.Option(30, help="Longest caption, in tokens."),
    min_len: int = typer.Option(1, help="Shortest caption, in tokens (EOS is suppressed before)."),
    seed: int = typer.Option(None, help="Sampling seed."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Caption images: greedy by default, beam search or top-k / top-p sampling."""
    import torch

    from grr_data.loader import preprocess_image
    from grr_train.checkpoint import load_model
    from grr_train.generate import DecodeOptions, generate

    try:
        options = DecodeOptions(beams=beams, top_k=top_k, top_p=top_p, temperature=temperature,
                                min_len=min_len, max_len=max_len, seed=seed)
        options.check()
        dev = pick_device(device)
        model, info = load_model(ckpt, device=dev)
        decode_words = decode_words_for(ckpt, tokenizer, Path(info["train_config"]["data"]))
        pixels = torch.stack([preprocess_image(path) for path in images])  # (N, 3, 288, 288)
        words = generate(model, pixels.to(dev), info["special"], options)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    for path, w in zip(images, words, strict=True):
        typer.echo(f"{path}: {decode_words(w)}")


def compare(
    run_a: Path = typer.Argument(..., help="First run (the reference, e.g. Baseline CoCa)."),
    run_b: Path = typer.Argument(..., help="Second run (e.g. GRR-CoCa)."),
    data: Path = typer.Option(..., help="Sharded set both runs are evaluated on."),
    out: Path = typer.Option(Path("reports/compare"), help="Folder for the report and plots."),
    split: str = typer.Option("val", help="Split of the set."),
    title: str = typer.Option(None, help="Section title (default: the set and split)."),
    name_a: str = typer.Option(None, help="Column name of the first run (default: its folder name)."),
    name_b: str = typer.Option(None, help="Column name of the second run (default: its folder name)."),
    contrastive_batch_size: int = typer.Option(None, help="Contrastive loss batch (default: run A's validation one)."),
    max_samples: int = typer.Option(None, help="Evaluate only the first N samples of the split."),
    batch_size: int = typer.Option(32, help="Loader batch size (does not change any number)."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Evaluate two runs on the same data; write the Table 2 layout (Markdown, JSON) and plots."""
    from grr_train.compare import compare_runs

    try:
        paths = compare_runs(
            run_a, run_b, data, out, split=split, title=title,
            names=(name_a or run_a.resolve().name, name_b or run_b.resolve().name),
            decode_words=decode_words_for(run_a, tokenizer, data),
            contrastive_batch_size=contrastive_batch_size, max_samples=max_samples, batch_size=batch_size,
            device=pick_device(device),
        )
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(Path(paths["markdown"]).read_text())
    for what, path in paths.items():
        typer.echo(f"{what}: {path}")
