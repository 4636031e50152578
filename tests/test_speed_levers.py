"""Issue 19's speed levers change nothing but speed (and float rounding): aligned widths give the
unpadded outputs and gradients with the same parameters and state dict; the fused LM head + caption
loss is `F.cross_entropy` of the head's logits; RoPE rotates q and k before the head transpose with
the same values; the merged cross-attention key/value GEMM gives each block's keys and values;
clipping folded into fused AdamW equals clipping then a plain AdamW step; a micro-batch of two
contrastive groups equals two micro-batches. All in fp32 on the CPU; expected values come from
torch's own functions (F.cross_entropy, clip_grad_norm_, torch.optim.AdamW) or the unchanged path."""

import pytest
import torch
import torch.nn.functional as F
from grad_capture import captured_grads

import grr_train.model.attention as attention
from grr_data.format.layout import SpecialIds
from grr_train.model import build_model, get_config
from grr_train.model.head_loss import linear_cross_entropy_sum
from grr_train.model.rope import apply_rope, rope_tables
from grr_train.model.summary import parameter_table
from grr_train.runtime.parallel import align_widths, resolve_switch
from grr_train.train.bench import synthetic_batch
from grr_train.train.step import StepSettings, TrainStep

V = 70  # not a multiple of 32: the fused loss pads it to 96
SPECIAL = SpecialIds.for_vocab(V)
IGNORED = tuple(SPECIAL.ignored_targets)


def tiny_model(seed=0, dropout=0.0, **overrides):
    torch.manual_seed(seed)
    return build_model(get_config("grr-tiny", vocab_size=V, dropout=dropout, **overrides))


def batch(n, seed=0):
    images, ids = synthetic_batch(n, SPECIAL, 288, torch.Generator().manual_seed(seed))
    return {"images": images, "ids": ids}


def loss_and_grads(model, b, fused: bool):
    """eq. 6's caption part plus a contrastive term, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    if fused:
        out = model(b["images"], b["ids"], caption_loss_ignoring=IGNORED)
        caption = out.caption_sum
    else:
        out = model(b["images"], b["ids"])
        targets = out.targets(b["ids"]).flatten()
        masked = targets.masked_fill(torch.isin(targets, torch.tensor(IGNORED)), -100)
        caption = F.cross_entropy(out.logits.flatten(0, 1), masked, ignore_index=-100, reduction="sum")
    loss = caption + 2.0 * (out.image_embed * out.text_embed).sum()
    loss.backward()
    return out, caption.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to b's largest magnitude (a per-tensor relative error)."""
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp(min=1e-30))


def assert_grads_close(got, expected, rel=1e-6):
    """Every parameter's gradient to `rel` of its largest magnitude; gradients a thousand times
    smaller than the model's largest (zero but for rounding, ~1e-8 where others are ~10) are
    compared at that thousandth."""
    assert got.keys() == expected.keys()
    floor = 1e-3 * max(float(g.abs().max()) for g in expected.values())
    for name, g in expected.items():
        diff, size = float((got[name] - g).abs().max()), float(g.abs().max())
        assert diff <= rel * max(size, floor), f"{name}: |difference| {diff:.1e} against largest {size:.1e}"


def test_aligned_widths_pad_the_paper_widths_and_keep_the_parameters():
    for preset, hidden, padded in (("grr-coca", 2073, 2080), ("grr-coca-1b", 2764, 2784), ("grr-coca-2b", 3801, 3808)):
        cfg = get_config(preset)
        model = build_model(cfg, device="meta")
        keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        changed = align_widths(model)
        assert (hidden, padded) in changed and (32_102, 32_128) in changed
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
        assert sum(p.numel() for p in model.parameters()) == sum(parameter_table(cfg).values())
    assert sum(parameter_table(get_config("grr-coca")).values()) == 394_548_926  # the paper's GRR-CoCa


def test_aligned_widths_give_the_unpadded_outputs_and_gradients():
    b = batch(3)
    plain = tiny_model()
    padded = tiny_model()
    state = {k: v.clone() for k, v in padded.state_dict().items()}
    assert ((172, 192) in align_widths(padded)) and padded.padded_vocab == 96  # grr-tiny: int(64 * 2.7)
    assert sum(p.numel() for p in padded.parameters()) == sum(p.numel() for p in plain.parameters())
    for fused in (False, True):
        out_p, cap_p, g_p = loss_and_grads(plain, b, fused)
        out_a, cap_a, g_a = loss_and_grads(padded, b, fused)
        assert max_rel(cap_a, cap_p) <= 1e-6
        assert max_rel(out_a.image_embed, out_p.image_embed) <= 1e-6
        assert max_rel(out_a.text_embed, out_p.text_embed) <= 1e-6
        if not fused:
            assert max_rel(out_a.logits, out_p.logits) <= 1e-6
        assert_grads_close(g_a, g_p)
    after = padded.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("padded_vocab", [None, 16])
def test_the_fused_head_loss_is_cross_entropy_of_the_heads_logits(padded_vocab):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    weight = (0.5 * torch.randn(11, 8)).requires_grad_()
    bias = (0.3 * torch.randn(11)).requires_grad_()
    targets = torch.randint(0, 11, (3, 7))
    ignored = (0, 4)
    ours = linear_cross_entropy_sum(hidden, weight, bias, targets, ignored, padded_vocab, chunk_rows=5)
    ours.backward(torch.tensor(0.7))  # a loss weight, so the backward's scaling is in the test
    mine = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    masked = targets.masked_fill((targets == 0) | (targets == 4), -100)
    ref = F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, 1), masked.flatten(), ignore_index=-100,
                          reduction="sum")
    (0.7 * ref).backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for got, t in zip(mine, (hidden, weight, bias), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-6, atol=1e-6)


def test_the_fused_head_loss_under_bf16_autocast_is_close_to_float32():
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(40, 16), 0.3 * torch.randn(50, 16), 0.1 * torch.randn(50)
    targets = torch.randint(0, 50, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy_sum(hidden[None], weight, bias, targets[None], (), 64, chunk_rows=16)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0)  # bf16 logits: ~3 significant digits


def test_rope_is_applied_before_the_head_transpose_with_the_same_values(monkeypatch):
    """q and k reach SDPA laid out (B, T, H, hd) (the T stride above the H stride), so flash and cuDNN
    write a (B, T, H, hd) output whose (B, T, D) reshape is a view; the rotated values are the
    textbook ones, bit for bit."""
    torch.manual_seed(0)
    attn = attention.Attention(64, 4)
    x = torch.randn(2, 9, 64)
    rope = rope_tables("1d", 0, 9, 16, 10_000.0, torch.device("cpu"), torch.float32)
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q, k)) or real(q, k, v, **kw))
    attn(x, rope=rope)
    q, k = seen[0]
    assert q.shape == (2, 4, 9, 16) and q.stride(2) > q.stride(1) and k.stride(2) > k.stride(1)
    heads = attn.qkv(x).view(2, 9, 3, 4, 16).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    assert torch.equal(q, apply_rope(heads[0], *rope)) and torch.equal(k, apply_rope(heads[1], *rope))


def test_merged_context_keys_and_values_are_each_blocks():
    model = tiny_model()
    context = torch.randn(2, 5, 64)
    each = model.multimodal.context_keys_values(context)
    model.multimodal.merge_context_kv = True
    merged = model.multimodal.context_keys_values(context)
    assert len(merged) == len(each) == 2
    for (k, v), (k_ref, v_ref) in zip(merged, each, strict=True):
        torch.testing.assert_close(k, k_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-7)


def step_with(model, micro_batches, settings, optimizer=None, lr=1e-2):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    return TrainStep(model, optimizer, SPECIAL, settings, torch.device("cpu"))(micro_batches)


@pytest.mark.parametrize("max_norm", [0.05, 1e9])  # clipping active, and not
def test_clipping_folded_into_fused_adamw_equals_clipping_then_a_plain_step(max_norm):
    b = [batch(2)]
    folded_model, model = tiny_model(), tiny_model()
    folded = step_with(folded_model, b, StepSettings(2.0, 1.0, max_norm, 0.07, clip_in_optimizer=True))
    # the reference: the same loss's gradients (the unfolded step at lr 0 leaves them), torch's
    # clip_grad_norm_, then a for-loop AdamW
    with captured_grads(model) as kept:
        step_with(model, b, StepSettings(2.0, 1.0, 1e9, 0.07), lr=0.0)
    for n, p in model.named_parameters():
        p.grad = kept[n]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=False)
    torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=False, fused=False).step()
    assert folded["grad_norm"] == pytest.approx(float(norm), rel=1e-6)  # the norm before clipping
    assert (float(norm) > max_norm) == (max_norm < 1)
    for (name, got), expected in zip(folded_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=name)


def grads_of_step(model, micro_batches, settings):
    with captured_grads(model) as kept:
        metrics = step_with(model, micro_batches, settings, lr=0.0)
    return metrics, kept


def test_a_micro_batch_of_two_contrastive_groups_equals_two_micro_batches():
    full = batch(6)
    halves = [{k: v[:3] for k, v in full.items()}, {k: v[3:] for k, v in full.items()}]
    two, g_two = grads_of_step(tiny_model(), halves, StepSettings(2.0, 1.0, 1e9, 0.07))
    one, g_one = grads_of_step(tiny_model(), [full], StepSettings(2.0, 1.0, 1e9, 0.07, contrastive_groups=2))
    whole, _ = grads_of_step(tiny_model(), [full], StepSettings(2.0, 1.0, 1e9, 0.07))
    for key in ("loss", "contrastive", "caption", "grad_norm"):
        assert one[key] == pytest.approx(two[key], rel=1e-5), key
    assert one["num_tokens"] == two["num_tokens"]
    assert whole["contrastive"] != pytest.approx(two["contrastive"], rel=1e-3)  # groups do change the loss
    assert_grads_close(g_one, g_two, rel=1e-5)


def test_auto_turns_on_only_what_a_gpu_measured(monkeypatch):
    import grr_train.runtime.parallel as parallel

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not resolve_switch("x", "auto", cpu) and not resolve_switch("x", "auto", cuda)  # not measured
    monkeypatch.setattr(parallel, "MEASURED_ON_CUDA", frozenset({"x"}))
    assert not resolve_switch("x", "auto", cpu) and resolve_switch("x", "auto", cuda)
    assert resolve_switch("x", "on", cpu) and not resolve_switch("x", "off", cuda)
    with pytest.raises(ValueError, match="x must be one of auto, on, off"):
        resolve_switch("x", "yes", cpu)


@pytest.mark.gpu
def test_a_launched_step_with_every_lever_makes_no_host_sync():
    """Aligned widths, the fused loss, clipping in the optimizer and two contrastive groups enqueue
    the whole step without waiting for the GPU, as the plain step does."""
    dev = torch.device("cuda")
    model = tiny_model(dropout=0.15).to(dev)
    align_widths(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, opt, SPECIAL, StepSettings(2.0, 1.0, 1.0, 0.07, autocast_dtype=torch.bfloat16,
                     fused_caption_loss=True, clip_in_optimizer=True, contrastive_groups=2), dev)
    micro = [{k: v.to(dev) for k, v in batch(4, s).items()} for s in range(2)]
    first = step(micro)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = step.launch(micro)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    m = pending.result()
    assert m["finite"] and m["num_tokens"] == first["num_tokens"]


@pytest.mark.gpu
def test_the_fused_head_loss_on_a_gpu_in_bf16_is_cross_entropy():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    hidden = torch.randn(4, 64, 768, device=dev, requires_grad=True)
    head = torch.nn.Linear(768, 32_102).to(dev)
    targets = torch.randint(0, 32_102, (4, 64), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, (), 32_128, chunk_rows=100)
        ref = F.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=0)
    g_ours = torch.autograd.grad(ours, (hidden, head.weight))
    g_ref = torch.autograd.grad(ref, (hidden, head.weight))
    for a, b in zip(g_ours, g_ref, strict=True):
        assert float((a - b).abs().max()) <= 2e-2 * float(b.abs().max())


def train(data, run_dir, **settings):
    from grr_train.runs.metrics import read_metrics
    from grr_train.train.config import TrainConfig
    from grr_train.train.trainer import run_training

    cfg = TrainConfig(preset="grr-tiny", data=str(data), per_device_batch_size=2, global_batch_size=8, epochs=1,
                      warmup_steps=1, lr_max=1e-3, lr_min=1e-4, num_workers=0, loader="cpu", val_split="none",
                      checkpoint_every=1000, keep_checkpoints=1, precision="fp32", compile="off", tensorboard=False)
    for key, value in settings.items():
        setattr(cfg, key, value)
    cfg.validate()
    run_training(cfg, run_dir)
    return read_metrics(run_dir, "train")


@pytest.mark.slow
def test_runs_with_the_levers_on_match_runs_with_them_off(tmp_path):
    """The trainer's wiring (settings -> parallelize and StepSettings.for_run): the switches on give
    the switches' off run, dropout and all (they draw no random numbers); a micro-batch of two
    contrastive groups gives the run of twice as many micro-batches (without dropout, whose masks
    would be drawn over other shapes)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from shardset import make_shardset

    data = make_shardset(tmp_path / "data", shard_sizes=(8, 8))
    off = dict(aligned_widths="off", fused_caption_loss="off", clip_in_optimizer="off")
    on = dict(aligned_widths="on", fused_caption_loss="on", clip_in_optimizer="on")
    pairs = [(train(data, tmp_path / "off", dropout=0.15, **off), train(data, tmp_path / "on", dropout=0.15, **on)),
             (train(data, tmp_path / "micro", dropout=0.0, **off),
              train(data, tmp_path / "groups", dropout=0.0, micro_batch_groups=2, **off))]
    for plain, fast in pairs:
        assert [r["step"] for r in fast] == [r["step"] for r in plain] == [1, 2]
        for a, b in zip(fast, plain, strict=True):
            for key in ("loss", "contrastive", "caption", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
