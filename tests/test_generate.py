"""Generation over the KV cache equals generation that recomputes the prefix, token for token."""

import pytest
import torch

from grr_data.format.layout import SpecialIds
from grr_train.infer.generate import DecodeOptions, _filter_top_k_top_p, generate
from grr_train.model import build_model, get_config

VOCAB = 300


@pytest.fixture(scope="module")
def model_and_special():
    torch.manual_seed(0)
    model = build_model(get_config("grr-tiny", vocab_size=VOCAB)).eval()
    # A random model's logits are nearly flat and barely see the image: sharpen the logits so
    # ties cannot decide a token, and strengthen cross-attention so captions differ per image.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for block in model.multimodal.blocks:
            block.cross_attn.q.weight.mul_(10)
            block.cross_attn.out.weight.mul_(30)
    return model, SpecialIds.for_vocab(VOCAB)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 288, 288)


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_equals_uncached(model_and_special, images, beams):
    model, special = model_and_special
    cached = generate(model, images, special, DecodeOptions(beams=beams, max_len=12))
    uncached = generate(model, images, special, DecodeOptions(beams=beams, max_len=12, use_cache=False))
    assert cached == uncached
    assert all(len(words) == 12 for words in cached)  # this model never picks EOS itself
    assert len({tuple(w) for w in cached}) > 1  # the captions depend on the image


@pytest.mark.slow
@pytest.mark.parametrize("beams, use_cache", [(2, True), (3, True), (3, False)])
def test_batched_beam_search_equals_one_image_at_a_time(model_and_special, beams, use_cache):
    model, special = model_and_special
    torch.manual_seed(1)
    images = torch.randn(6, 3, 288, 288)
    options = DecodeOptions(beams=beams, max_len=12, use_cache=use_cache)
    with torch.no_grad():
        model.lm_head.bias[special.eos] += 5.0  # some images end at once, others run to max_len
    try:
        batched = generate(model, images, special, options)
        alone = [generate(model, images[i : i + 1], special, options)[0] for i in range(len(images))]
    finally:
        with torch.no_grad():
            model.lm_head.bias[special.eos] -= 5.0
    assert batched == alone
    # images finished at different steps, so some left the batch while others searched on
    assert len({len(words) for words in batched}) > 1


def test_sampling_is_seeded_and_cache_independent(model_and_special, images):
    model, special = model_and_special
    opts = dict(top_k=20, top_p=0.95, temperature=1.5, seed=7, max_len=8)
    a = generate(model, images, special, DecodeOptions(**opts))
    b = generate(model, images, special, DecodeOptions(**opts, use_cache=False))
    c = generate(model, images, special, DecodeOptions(**{**opts, "seed": 8}))
    assert a == b
    assert a != c


def test_eos_stops_and_min_len_suppresses_it(model_and_special, images):
    model, special = model_and_special
    with torch.no_grad():
        model.lm_head.bias[special.eos] += 1e4  # EOS wins wherever it is allowed
    try:
        for beams in (1, 2):
            out = generate(model, images, special, DecodeOptions(beams=beams, min_len=3, max_len=10))
            assert [len(w) for w in out] == [3, 3, 3]
            assert all(t not in (special.bos, special.cls, special.pad, special.eos) for w in out for t in w)
        out = generate(model, images, special, DecodeOptions(min_len=0, max_len=10))
        assert out == [[], [], []]
    finally:
        with torch.no_grad():
            model.lm_head.bias[special.eos] -= 1e4


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _filter_top_k_top_p(logits, top_k=3, top_p=None).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    kept = _filter_top_k_top_p(logits, top_k=None, top_p=0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reach 0.8
    kept = _filter_top_k_top_p(logits, top_k=None, top_p=0.1).isfinite()
    assert kept.tolist() == [[True, False, False, False]]  # the most likely token always stays


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="not both"):
        DecodeOptions(beams=2, top_k=5).check()
    with pytest.raises(ValueError, match="max_len"):
        DecodeOptions(max_len=80).check()
    with pytest.raises(ValueError, match="min_len"):
        DecodeOptions(min_len=5, max_len=3).check()
