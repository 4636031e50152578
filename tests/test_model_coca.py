"""Tests of the assembled CoCa: paper parameter counts, config round trip, forward/backward,
causality, PAD masking, cached decoding and the FLOPs count."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from grr_train.model import PRESETS, ModelConfig, build_model, get_config
from grr_train.model.summary import forward_macs, parameter_table

V = 1_000  # a small vocabulary keeps the LM head cheap; the paper's 32,102 is counted on meta
BOS, EOS, CLS, PAD = V - 2, 1, V - 1, 0


def layout(num_words: int, gen: torch.Generator) -> list[int]:
    words = torch.randint(2, V - 2, (num_words,), generator=gen).tolist()
    ids = [BOS, *words, EOS]
    return ids + [PAD] * (63 - len(ids)) + [CLS, PAD]


def batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([layout(n, gen) for n in lengths])
    images = torch.randn(len(lengths), 3, 288, 288, generator=gen)
    return images, ids


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(get_config("grr-tiny", vocab_size=V, dropout=0.0)).eval()


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_paper_parameter_counts():
    assert trainable(build_model(get_config("grr-coca"), device="meta")) == 394_548_926
    assert trainable(build_model(get_config("baseline-coca"), device="meta")) == 393_863_270


def test_component_table_matches_design():
    grr, base = parameter_table(get_config("grr-coca")), parameter_table(get_config("baseline-coca"))
    assert grr["ViT blocks"] == 85_740_120 and base["ViT blocks"] == 85_054_464
    same = {
        "patch embed": 747_264,
        "token embedding": 24_654_336,
        "unimodal decoder": 113_384_448,
        "multimodal decoder": 141_742_080,
        "final norm": 768,
        "LM head": 24_686_438,
        "poolers": 49_920 + 2_362_368,
        "projections": 1_181_184,
        "ViT final norm": 0,
    }
    for label, count in same.items():
        assert grr[label] == base[label] == count, label
    assert sum(grr.values()) == 394_548_926


def test_rope_variants_share_counts_and_ablations_differ():
    counts = {name: sum(parameter_table(cfg).values()) for name, cfg in PRESETS.items() if "tiny" not in name}
    assert counts["grr-coca-rope2d"] == counts["grr-coca"]
    assert counts["baseline+rope"] == counts["baseline+rope2d"] == counts["baseline-coca"]
    assert counts["baseline+rmsnorm"] == counts["baseline-coca"] - 12 * 2 * 768
    assert counts["baseline+geglu"] - counts["baseline-coca"] == 12 * (4_781_106 - 4_722_432)


def test_config_round_trip_and_errors():
    cfg = get_config("grr-coca-rope2d", dropout=0.1)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.dropout == 0.1 and cfg.num_patches == 256 and cfg.vit_hidden == 2073
    with pytest.raises(KeyError, match="unknown model preset"):
        get_config("grr-huge")
    with pytest.raises(ValueError, match="unknown model config fields"):
        get_config("grr-coca", widht=5)
    with pytest.raises(ValueError, match="vit_pos"):
        get_config("grr-coca", vit_pos="learned")
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "extra": 1})


@pytest.mark.parametrize("fields, message", [
    (dict(vit_norm="batchnorm"), "vit_norm 'batchnorm' is not one of ('layernorm', 'rmsnorm')"),
    (dict(vit_ffn="swiglu"), "vit_ffn 'swiglu' is not one of ('mlp', 'geglu')"),
    (dict(vit_pos="alibi"), "vit_pos 'alibi' is not one of ('sincos', 'rope1d', 'rope2d')"),
    (dict(image_size=289), "image_size 289 is not a multiple of patch_size 48"),
    (dict(width=66), "width 66 is not a multiple of heads 4"),
    (dict(width=24), "head size 6 must be a multiple of 4 (2D RoPE splits it in pairs per axis)"),
    (dict(cls_index=64), "cls_index 64 lies outside the 64 inputs"),
    (dict(cls_index=-1), "cls_index -1 lies outside the 64 inputs"),
    (dict(dropout=1.0), "dropout 1.0 is not in [0, 1)"),
    (dict(dropout=-0.1), "dropout -0.1 is not in [0, 1)"),
    (dict(temperature=0.0), "temperature 0.0 must be positive"),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, dict) else None)
def test_model_config_refuses(fields, message):
    with pytest.raises(ValueError, match=r"^invalid model config: " + re.escape(message) + "$"):
        get_config("grr-tiny", **fields)


def test_model_config_lists_every_problem_at_once():
    with pytest.raises(ValueError, match=r"vit_ffn 'x' .*; dropout 2.0 is not in \[0, 1\); temperature -1.0"):
        get_config("grr-tiny", vit_ffn="x", dropout=2.0, temperature=-1.0)


@pytest.mark.parametrize("preset", ["grr-tiny", "baseline-tiny", "grr-tiny-rope2d"])
def test_forward_backward(preset):
    torch.manual_seed(0)
    model = build_model(get_config(preset, vocab_size=V)).train()
    images, ids = batch([5, 20, 61])
    out = model(images, ids)
    assert out.image_embed.shape == out.text_embed.shape == (3, 64)
    assert out.logits.shape == (3, 64, V)
    torch.testing.assert_close(out.image_embed.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embed.norm(dim=-1), torch.ones(3))
    (out.logits.logsumexp(-1).mean() + (out.image_embed * out.text_embed).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_encoders_match_forward(tiny):
    images, ids = batch([7, 30])
    out = tiny(images, ids)
    image_embed, image_tokens = tiny.encode_image(images)
    assert image_tokens.shape == (2, 64, 64)
    torch.testing.assert_close(image_embed, out.image_embed)
    torch.testing.assert_close(tiny.encode_text(ids), out.text_embed)


def test_bad_shapes_are_named(tiny):
    images, ids = batch([3])
    with pytest.raises(ValueError, match="288"):
        tiny(images[:, :, :224, :224], ids)
    with pytest.raises(ValueError, match="laid-out ids"):
        tiny(images, ids[:, :30])


def test_caption_logits_are_causal(tiny):
    images, ids = batch([40])
    changed = ids.clone()
    changed[0, 21:41] = torch.randint(2, V - 2, (20,))  # words after position 20
    a, b = tiny(images, ids).logits, tiny(images, changed).logits
    torch.testing.assert_close(a[0, :21], b[0, :21])
    assert not torch.allclose(a[0, 21:41], b[0, 21:41])


def test_pad_positions_change_nothing_the_losses_read(tiny):
    images, ids = batch([4, 12])
    noisy = ids.clone()
    pads = noisy == PAD
    noisy[pads] = torch.randint(2, V - 2, (int(pads.sum()),))
    out, out_noisy = tiny(images, ids), tiny(images, noisy)
    torch.testing.assert_close(out.text_embed, out_noisy.text_embed)
    # logits read by the caption loss: input positions 0..EOS-1 (their targets are words and EOS)
    for row, n in enumerate([4, 12]):
        torch.testing.assert_close(out.logits[row, : n + 1], out_noisy.logits[row, : n + 1])


def test_no_nan_when_a_row_is_all_padding(tiny):
    images, ids = batch([3])
    out = tiny(images, torch.zeros_like(ids))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.text_embed).all()


@pytest.mark.slow
def test_cached_decode_equals_full_forward(tiny):
    images, ids = batch([9, 25])
    out = tiny(images, ids)
    _, image_tokens = tiny.encode_image(images)
    full, _ = tiny.decode(image_tokens, ids[:, :64])
    torch.testing.assert_close(full, out.logits, atol=1e-4, rtol=1e-4)
    # a prefix of 3, then one token at a time, through the PADs and CLS
    logits, cache = tiny.decode(image_tokens, ids[:, :3])
    steps = [logits]
    for t in range(3, 64):
        logits, cache = tiny.decode(image_tokens, ids[:, t : t + 1], cache)
        steps.append(logits)
    assert cache.length == 64
    torch.testing.assert_close(torch.cat(steps, dim=1), out.logits, atol=1e-4, rtol=1e-4)


def eager_attention(q, k, v, attn_mask=None, dropout_p=0.0):
    # SDPA's CPU kernels are invisible to FlopCounterMode; these matmuls are counted.
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if attn_mask is not None:  # boolean (True where allowed) or additive
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ v


def test_eager_attention_is_sdpa():
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(eager_attention(q, k, v, mask), expected)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(eager_attention(q, k, v, additive), expected)


@pytest.mark.parametrize("preset", ["grr-tiny", "baseline-tiny"])
def test_flops_count_matches_torch_flop_counter(preset, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", eager_attention)
    cfg = get_config(preset, vocab_size=V, dropout=0.0)
    model = build_model(cfg).eval()
    images, ids = batch([10])
    counter = FlopCounterMode(display=False)
    with counter:
        model(images, ids)
    assert counter.get_total_flops() == 2 * sum(forward_macs(cfg).values())
