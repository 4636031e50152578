"""Compiling the whole training step of the tiny preset (issue 19): every compiled region (each
transformer block, and each step of the forward between them: model/coca.py's REGIONS) traces
as one graph with no graph break, the compiled step computes what the eager one does, trimmed
text in buckets of 16 positions equals the full 64 (and compiles to a few shapes), and dropout,
eager or compiled with either random-number path, keeps each element with probability 0.85,
reproducibly under a seed."""

import math

import pytest
import torch
from grad_capture import captured_grads
from torch._dynamo.utils import counters

from grr_data.format.layout import SpecialIds, build_layout
from grr_train.model import build_model, get_config
from grr_train.model.coca import REGIONS
from grr_train.runtime.parallel import TRIM_BUCKET, align_widths, apply_compile, set_inductor_random
from grr_train.train.step import StepSettings, TrainStep

V = 70
SPECIAL = SpecialIds.for_vocab(V)
IGNORED = tuple(SPECIAL.ignored_targets)


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return build_model(get_config("grr-tiny", vocab_size=V, dropout=dropout))


def batch(word_counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [build_layout(torch.randint(2, SPECIAL.bos, (n,), generator=g).tolist(), SPECIAL)[0] for n in word_counts]
    return {"images": torch.randn(len(rows), 3, 288, 288, generator=g), "ids": torch.tensor(rows)}


@pytest.fixture
def dynamo_strict():
    """Errors raise (apply_compile lets a failing graph run eagerly, which would hide a break);
    counters and compiled code start empty; the process's settings come back afterwards."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.suppress_errors = False
    set_inductor_random("default")


def compiled(mode="regions", backend="eager", seed=0, dropout=0.0):
    model = tiny_model(seed, dropout)
    align_widths(model)
    apply_compile(model, mode, backend=backend)
    torch._dynamo.config.suppress_errors = False
    return model


def all_levers(**extra) -> StepSettings:
    return StepSettings(2.0, 1.0, 1.0, 0.07, fused_caption_loss=True, clip_in_optimizer=True, trim_text_padding=True,
                        trim_bucket=TRIM_BUCKET, **extra)


def run_steps(model, settings, batches, lr=1e-3):
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=lr, fused=True), SPECIAL, settings,
                     torch.device("cpu"))
    return [step([b]) for b in batches]


def test_each_region_traces_as_one_graph_without_a_break(dynamo_strict):
    model = tiny_model()
    align_widths(model)
    b = batch([3, 20])
    seen = {}
    for path in REGIONS:  # record each region's inputs from an eager forward
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        real = getattr(owner, name)
        setattr(owner, name, lambda *a, _real=real, _path=path, **k: seen.setdefault(_path, (_real, a, k)) and _real(*a, **k))
    model(b["images"], b["ids"], trim_padding=True, trim_bucket=TRIM_BUCKET)
    model(b["images"], b["ids"], caption_loss_ignoring=IGNORED)
    assert set(seen) == set(REGIONS)
    for path, (fn, args, kwargs) in seen.items():
        report = torch._dynamo.explain(fn)(*args, **kwargs)
        assert (report.graph_count, report.graph_break_count) == (1, 0), f"{path}: {report.break_reasons}"


@pytest.mark.slow
def test_the_whole_compiled_step_has_no_graph_break_and_few_graphs(dynamo_strict):
    """Blocks and regions through AOT autograd (forward and backward), caption lengths in three
    buckets, the fused loss, aligned widths and clipping in the optimizer: no break anywhere, and
    the blocks compile once per bucket (not once per length)."""
    model = compiled(backend="aot_eager")
    lengths = [[3, 5], [4, 9], [12, 30], [13, 29], [40, 2]]  # buckets of 16, 16, 48, 48, 64 (untrimmed)
    metrics = run_steps(model, all_levers(), [batch(w, seed=i) for i, w in enumerate(lengths)])
    assert all(m["finite"] for m in metrics)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # ViT block 1 graph; decoder blocks 2 (self-only, cross) x 3 bucket shapes; regions: one each,
    # those of the text once per bucket shape (text_inputs, text_embedding, caption_loss_sum)
    assert counters["stats"]["unique_graphs"] <= 1 + 2 * 3 + len(REGIONS) + 3 * 2


def step_grads(model, settings, batches):
    """The metrics of each step and the gradients of the last (lr 0: the weights stay, so each step
    starts where the other model's does; AdamW's update would turn rounding into sign flips)."""
    with captured_grads(model) as grads:
        metrics = run_steps(model, settings, batches, lr=0.0)
    return metrics, grads


@pytest.mark.slow
def test_the_step_compiled_by_inductor_computes_what_the_eager_step_does(dynamo_strict):
    batches = [batch([3, 11], seed=0), batch([25, 7], seed=1)]
    eager = tiny_model()
    align_widths(eager)
    expected, g_eager = step_grads(eager, all_levers(), batches)
    got, g_compiled = step_grads(compiled(backend="inductor"), all_levers(), batches)
    assert not counters["graph_break"]
    for m, e in zip(got, expected, strict=True):
        for key in ("loss", "contrastive", "caption", "grad_norm"):
            assert m[key] == pytest.approx(e[key], rel=1e-4), key
    floor = 1e-3 * max(float(g.abs().max()) for g in g_eager.values())
    for name, g in g_eager.items():
        diff = float((g_compiled[name] - g).abs().max())
        assert diff <= 1e-4 * max(float(g.abs().max()), floor), f"{name}: {diff:.1e}"


def caption_sums_and_grads(model, b, bucket):
    model.zero_grad(set_to_none=True)
    out = model(b["images"], b["ids"], trim_padding=bucket is not None, trim_bucket=bucket or 1,
                caption_loss_ignoring=IGNORED)
    (out.caption_sum + 2.0 * (out.image_embed * out.text_embed).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("words, kept", [([3, 9, 1], 16), ([3, 20, 1], 32), ([30, 2], 48), ([61], None)])
def test_bucketed_trimming_equals_the_full_64_positions(words, kept):
    b = batch(words)
    model = tiny_model()
    full, g_full = caption_sums_and_grads(model, b, None)
    trimmed, g_trim = caption_sums_and_grads(model, b, TRIM_BUCKET)
    assert (None if trimmed.positions is None else len(trimmed.positions)) == kept
    if kept is not None:  # the longest caption's positions and CLS, then padding up to the bucket
        longest = max(words) + 2  # BOS, words, EOS
        assert trimmed.positions.tolist() == list(range(kept - 1)) + [63] and longest <= kept - 1
    for a, e in ((trimmed.caption_sum, full.caption_sum), (trimmed.text_embed, full.text_embed),
                 (trimmed.image_embed, full.image_embed)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    for name, g in g_full.items():
        torch.testing.assert_close(g_trim[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def dropout_paths():
    """(name, function x, y -> x + dropout(y)) for each way a training step draws dropout: a ViT
    block's residual dropout of the pretraining preset, eager and compiled."""
    drop = tiny_model(dropout=0.15).vit.blocks[0].drop.train()

    def residual(x, y):
        return x + drop(y)

    yield "eager", residual
    for kind in ("default", "fallback"):
        set_inductor_random(kind)
        yield f"inductor {kind}", torch.compile(residual, backend="inductor")


@pytest.mark.slow
def test_dropout_keeps_each_element_with_probability_085_reproducibly(dynamo_strict):
    n = 1 << 20
    x, y = torch.zeros(n), torch.full((n,), 2.0)
    sigma = math.sqrt(0.85 * 0.15 / n)  # the binomial proportion's standard deviation, 3.5e-4
    for name, residual in dropout_paths():
        torch.manual_seed(11)
        first, second = residual(x, y), residual(x, y)
        torch.manual_seed(11)
        again = residual(x, y)
        kept = first != 0
        assert abs(kept.float().mean().item() - 0.85) < 5 * sigma, name
        torch.testing.assert_close(first[kept], torch.full_like(first[kept], 2.0 / 0.85), msg=name)  # x / 0.85
        assert torch.equal(first, again), f"{name}: the same seed must draw the same mask"
        both = (kept & (second != 0)).float().mean().item()  # independent draws: 0.85^2 of elements
        assert abs(both - 0.85**2) < 5 * math.sqrt(0.7225 * 0.2775 / n), name
        halves = kept.view(2, -1).float().mean(dim=1)  # no drift along the tensor
        assert (halves - 0.85).abs().max().item() < 5 * sigma * math.sqrt(2), name
