"""Unit tests of the model's building blocks: norms, GEGLU, RoPE, sinusoids, attention masks."""

import math

import pytest
import torch

from grr_train.model.attention import Attention
from grr_train.model.ffn import GEGLU, Mlp
from grr_train.model.norms import RMSNorm, make_norm
from grr_train.model.posembed import sincos_1d
from grr_train.model.rope import apply_rope, rope_1d, rope_2d
from grr_train.model.text import decoder_mask


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    ours, ref = RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        w = torch.randn(32)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = torch.randn(4, 7, 32) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x))
    assert sum(p.numel() for p in ours.parameters()) == 32  # weight only
    assert sum(p.numel() for p in RMSNorm(32, affine=False).parameters()) == 0


def test_rmsnorm_keeps_bf16_dtype():
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert RMSNorm(16)(x).dtype == torch.bfloat16


def test_norm_factory_counts():
    assert sum(p.numel() for p in make_norm("layernorm", 768).parameters()) == 1536
    assert sum(p.numel() for p in make_norm("rmsnorm", 768).parameters()) == 768
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("batchnorm", 8)


def test_geglu_shape_and_count():
    hidden = int(768 * 2.7)
    assert hidden == 2073
    geglu = GEGLU(768, hidden)
    # W, V and O with biases (paper eq. 1).
    assert sum(p.numel() for p in geglu.parameters()) == 2 * (768 * 2073 + 2073) + 2073 * 768 + 768
    assert geglu(torch.randn(2, 5, 768)).shape == (2, 5, 768)


def test_geglu_is_gelu_gate_times_value():
    torch.manual_seed(0)
    geglu = GEGLU(6, 4)
    x = torch.randn(3, 6)
    w, v = geglu.wv.weight[:4], geglu.wv.weight[4:]
    wb, vb = geglu.wv.bias[:4], geglu.wv.bias[4:]
    expected = (torch.nn.functional.gelu(x @ w.T + wb) * (x @ v.T + vb)) @ geglu.o.weight.T + geglu.o.bias
    torch.testing.assert_close(geglu(x), expected)


def test_mlp_count_matches_baseline_vit():
    assert sum(p.numel() for p in Mlp(768, 3072).parameters()) == 4_722_432


def _score(q, k, cos, sin, i, j):
    return (
        apply_rope(q[None], cos[i : i + 1], sin[i : i + 1])
        * apply_rope(k[None], cos[j : j + 1], sin[j : j + 1])
    ).sum()


def test_rope_1d_score_depends_only_on_offset():
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    cos, sin = rope_1d(torch.arange(40), 16)
    for offset in (0, 3, -5):
        scores = [_score(q, k, cos, sin, i, i - offset) for i in range(10, 30)]
        torch.testing.assert_close(torch.stack(scores), scores[0].expand(len(scores)), atol=1e-4, rtol=1e-4)
    # and it does depend on the offset
    assert not torch.allclose(_score(q, k, cos, sin, 10, 10), _score(q, k, cos, sin, 10, 7))


def test_rope_preserves_norm():
    x = torch.randn(3, 10, 16)
    cos, sin = rope_1d(torch.arange(10), 16)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_rope_2d_score_depends_only_on_row_and_column_offsets():
    torch.manual_seed(0)
    grid = 6
    q, k = torch.randn(16), torch.randn(16)
    cos, sin = rope_2d(grid, grid, 16)

    def at(r, c):
        return r * grid + c

    # same (dr, dc) anywhere on the grid -> same score
    base = _score(q, k, cos, sin, at(3, 4), at(1, 2))
    torch.testing.assert_close(_score(q, k, cos, sin, at(5, 3), at(3, 1)), base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_score(q, k, cos, sin, at(2, 5), at(0, 3)), base, atol=1e-4, rtol=1e-4)
    # two pairs one step apart in the patch sequence, but (row +1, col -5) versus (0, +1):
    # 1D RoPE would score them the same, axial 2D RoPE does not
    wrap = _score(q, k, cos, sin, at(3, 0), at(2, 5))
    step = _score(q, k, cos, sin, at(2, 5), at(2, 4))
    assert not torch.allclose(wrap, step)
    # the row part only rotates the first half of the pairs
    cos_r, _ = rope_2d(grid, grid, 16)
    assert torch.equal(cos_r[at(0, 3), :4], torch.ones(4))  # row 0: no rotation in the row quarter


def test_sincos_is_vaswani():
    table = sincos_1d(10, 8)
    assert table.shape == (10, 8)
    assert table[3, 2].item() == pytest.approx(math.sin(3 / 10_000 ** (2 / 8)), abs=1e-6)
    assert table[3, 3].item() == pytest.approx(math.cos(3 / 10_000 ** (2 / 8)), abs=1e-6)


def test_attention_count_matches_multihead_attention():
    ours = sum(p.numel() for p in Attention(768, 12).parameters())
    ref = sum(p.numel() for p in torch.nn.MultiheadAttention(768, 12).parameters())
    assert ours == ref == 4 * 768 * 768 + 4 * 768


def test_decoder_mask_causal_pad_and_self():
    key_valid = torch.tensor([[True, True, False, False, True]])
    mask = decoder_mask(key_valid, 5)[0, 0]
    assert mask[1].tolist() == [True, True, False, False, False]
    assert mask[3].tolist() == [True, True, False, True, False]  # a PAD query sees itself
    assert mask[4].tolist() == [True, True, False, False, True]
    # queries for the last 2 positions of 5 (a cached step)
    assert decoder_mask(key_valid, 2)[0, 0].tolist() == mask[3:].tolist()
