"""Trimming the text decoders to the positions a batch uses (`CoCa.forward(trim_padding=True)`,
the `trim_text_padding` setting): the same losses, text embeddings and gradients as the full 64
positions (fp32, up to float rounding), nothing trimmed when a caption fills the layout, the kept
logits equal the full ones at their positions, a training run with the setting matches one
without, and a whole-model graph with the setting is refused in one line (per-block compiles take
it in buckets: tests/test_speed_compile.py)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grr_data.format.layout import CLS_INDEX, SpecialIds, build_layout
from grr_train.model import build_model, get_config
from grr_train.model.coca import CoCa
from grr_train.model.rope import rope_tables, rope_tables_at
from grr_train.runs.metrics import read_metrics
from grr_train.train import setup as run_checks
from grr_train.train.config import TrainConfig
from grr_train.train.losses import coca_loss
from grr_train.train.settings import parse_set, resolve_config
from grr_train.train.trainer import run_training

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

V = 64
SPECIAL = SpecialIds.for_vocab(V)
RTOL = 1e-5  # relative, on each loss, embedding and gradient (fp32); measured maxima are ~1e-7
KEPT_POSITIONS = CoCa._kept_positions  # the real one, which `run` spies on


def tiny_model(seed: int = 0) -> CoCa:
    torch.manual_seed(seed)
    return build_model(get_config("grr-tiny", vocab_size=V, dropout=0.0))


def batch(word_counts, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and captions of the given numbers of words, laid out (B, 65)."""
    g = torch.Generator().manual_seed(seed)
    rows = [build_layout(torch.randint(2, SPECIAL.bos, (n,), generator=g).tolist(), SPECIAL)[0]
            for n in word_counts]
    return torch.randn(len(rows), 3, 288, 288, generator=g), torch.tensor(rows)


def losses_and_grads(model: CoCa, images, ids, trim: bool):
    model.zero_grad(set_to_none=True)
    out = model(images, ids, trim_padding=trim)
    parts = coca_loss(out, ids, SPECIAL, lambda_con=0.7, lambda_cap=1.3, temperature=0.07, gather=False)
    parts["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, parts, grads


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to b's largest magnitude (a per-tensor relative error)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trimming_gives_the_same_losses_embeddings_and_gradients(capsys, one_thread):
    images, ids = batch([3, 9, 1, 14, 6, 11])
    model = tiny_model()
    full, full_parts, full_grads = losses_and_grads(model, images, ids, trim=False)
    trimmed, parts, grads = losses_and_grads(model, images, ids, trim=True)
    assert trimmed.positions is not None and trimmed.logits.shape[1] == 14 + 3  # BOS 14 words EOS, CLS

    assert int(parts["num_tokens"]) == int(full_parts["num_tokens"]) == sum([3, 9, 1, 14, 6, 11]) + 6
    diffs = {key: max_rel(parts[key].detach(), full_parts[key].detach())
             for key in ("contrastive", "caption_sum", "loss")}
    diffs["text_embed"] = max_rel(trimmed.text_embed.detach(), full.text_embed.detach())
    diffs["image_embed"] = max_rel(trimmed.image_embed.detach(), full.image_embed.detach())
    assert sorted(grads) == sorted(full_grads)  # the same parameters get gradients
    grad_diffs = {name: max_rel(grads[name], g) for name, g in full_grads.items()}
    worst = max(grad_diffs, key=grad_diffs.get)
    with capsys.disabled():
        print("\ntrim vs full, max relative difference: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
              + f", gradients {grad_diffs[worst]:.1e} ({worst})")
    assert all(v <= RTOL for v in diffs.values()), diffs
    assert grad_diffs[worst] <= RTOL, (worst, grad_diffs[worst])


def test_kept_logits_equal_the_full_logits_at_their_positions():
    images, ids = batch([5, 2, 8])
    model = tiny_model().eval()
    with torch.no_grad():
        full, trimmed = model(images, ids), model(images, ids, trim_padding=True)
    kept = list(range(8 + 2)) + [CLS_INDEX]  # BOS, 8 words, EOS of the longest; then CLS
    assert trimmed.positions.tolist() == kept
    torch.testing.assert_close(trimmed.logits, full.logits[:, kept], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(trimmed.targets(ids), ids[:, 1:][:, kept], rtol=0, atol=0)
    assert full.positions is None and torch.equal(full.targets(ids), ids[:, 1:])
    # What was dropped predicts only targets the caption loss ignores (PAD, or CLS at 62).
    dropped = [p for p in range(64) if p not in kept]
    assert set(ids[:, 1:][:, dropped].unique().tolist()) <= set(SPECIAL.ignored_targets)


@pytest.mark.parametrize("longest, expect_trimmed", [(61, False), (60, True)])
def test_a_caption_that_fills_the_layout_trims_nothing(longest, expect_trimmed):
    """61 words (the layout's most) use positions 0..62, so nothing is dropped; 60 drop position 62."""
    images, ids = batch([2, longest, 4])
    model = tiny_model().eval()
    with torch.no_grad():
        full, trimmed = model(images, ids), model(images, ids, trim_padding=True)
    if expect_trimmed:
        assert trimmed.positions.tolist() == [*range(62), CLS_INDEX]
        torch.testing.assert_close(trimmed.logits, full.logits[:, trimmed.positions], rtol=RTOL, atol=1e-6)
    else:
        assert trimmed.positions is None and trimmed.logits.shape == full.logits.shape
        assert torch.equal(trimmed.logits, full.logits) and torch.equal(trimmed.text_embed, full.text_embed)


def test_rope_tables_at_positions_are_the_full_tables_rows():
    positions = (0, 1, 2, 3, 63)
    cos, sin = rope_tables("1d", 0, 64, 16, 10_000.0, torch.device("cpu"), torch.float32)
    cos_at, sin_at = rope_tables_at(positions, 16, 10_000.0, torch.device("cpu"), torch.float32)
    assert torch.equal(cos_at, cos[list(positions)]) and torch.equal(sin_at, sin[list(positions)])


def test_positions_with_a_decoding_cache_are_refused():
    model = tiny_model()
    x = torch.zeros(1, 2, model.cfg.width)
    with pytest.raises(ValueError, match="one per token and no cache"):
        model.unimodal(x, torch.ones(1, 2, dtype=torch.bool), caches=[{} for _ in model.unimodal.blocks],
                       positions=(0, 63))


# --- the setting, through the trainer ---------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Train (8) and val (4) splits; captions of 1-12 words, so every batch trims."""
    root = tmp_path_factory.mktemp("trim-data")
    make_shardset(root, shard_sizes=(4,), split="val", seed=1)
    val = json.loads((root / "manifest.json").read_text())["splits"]["val"]
    make_shardset(root, shard_sizes=(8,), split="train", seed=0)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["val"] = val
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def run(data: Path, run_dir: Path, sets: list[str], monkeypatch) -> tuple[dict, list[tuple[bool, bool]]]:
    """Train 4 steps (2 epochs, validation after each) with `--set` items; (losses by kind, and
    per forward: whether the model was training and whether it trimmed)."""
    cfg = replace(TrainConfig(), preset="grr-tiny", data=str(data), dropout=0.0, per_device_batch_size=2,
                  global_batch_size=4, warmup_steps=1, lr_max=1e-3, lr_min=1e-4, num_workers=0, loader="cpu",
                  val_batch_size=4, val_contrastive_batch_size=2, checkpoint_every=1000, keep_checkpoints=1,
                  epochs=2, precision="fp32", compile="off", tensorboard=False, lambda_con=0.7, lambda_cap=1.3,
                  **parse_set(sets))
    cfg.validate()
    calls = []

    def spy(model, key_valid, *bucket):
        kept = KEPT_POSITIONS(model, key_valid, *bucket)
        calls.append((model.training, kept is not None))
        return kept

    monkeypatch.setattr(CoCa, "_kept_positions", spy)
    run_training(cfg, run_dir)
    records = {kind: read_metrics(run_dir, kind) for kind in ("train", "val")}
    return records, calls


def test_a_run_with_trim_text_padding_matches_one_without(tmp_path, data, monkeypatch, one_thread):
    full, full_calls = run(data, tmp_path / "full", [], monkeypatch)
    trimmed, calls = run(data, tmp_path / "trim", ["trim_text_padding=true"], monkeypatch)
    assert full_calls == []  # the default never trims
    # Every training micro-batch (4 steps x 2) and validation batch (one per epoch) trimmed.
    assert calls.count((True, True)) == 8 and calls.count((False, True)) == 2, calls
    assert [r["step"] for r in trimmed["train"]] == [1, 2, 3, 4] and len(trimmed["val"]) == 2
    for kind in ("train", "val"):
        for a, b in zip(trimmed[kind], full[kind], strict=True):
            assert a.get("num_tokens") == b.get("num_tokens")  # val records count them
            for key in ("loss", "contrastive", "caption") + (("grad_norm",) if kind == "train" else ()):
                assert a[key] == pytest.approx(b[key], rel=1e-4), (kind, a["step"], key)
    assert json.loads((tmp_path / "trim" / "config.json").read_text())["train"]["trim_text_padding"] is True


def test_a_whole_model_graph_with_trimming_is_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        resolve_config("pretrain", sets=["trim_text_padding=true", "compile=model"])
    message = str(err.value)
    assert "\n" not in message and "trim_text_padding" in message and "compile=blocks" in message
    assert "'model'" in message


@pytest.mark.parametrize("mode", ["off", "blocks", "regions"])
def test_per_block_compiles_take_trimming(mode):
    assert resolve_config("pretrain", sets=["trim_text_padding=true", f"compile={mode}"]).compile == mode


def test_compile_auto_with_trimming_compiles_per_block_where_it_compiles():
    """compile=auto compiles on CUDA only, per block, which takes trimmed lengths in buckets; a
    whole-model graph is refused on the device too (before training)."""
    cfg = replace(TrainConfig(), trim_text_padding=True)
    cfg.validate()
    assert run_checks.compile_mode(cfg, torch.device("cpu")) == "off"
    assert run_checks.compile_mode(cfg, torch.device("cuda")) == "blocks"
    with pytest.raises(ValueError, match=r"^trim_text_padding=true .*'model \(model on cuda\)'.*compile=blocks"):
        run_checks.compile_mode(replace(cfg, compile="model"), torch.device("cuda"))
