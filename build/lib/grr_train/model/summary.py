"""Parameter tables and analytic training FLOPs per sample for a model config.

FLOPs are counted the way MFU is usually reported (PaLM appendix B, nanoGPT `estimate_mfu`):
2 FLOPs per multiply-add of every matmul, including attention's score (QK^T) and value (AV)
products, counted dense (causal masking is not subtracted, as SDPA kernels with a mask do the
full product); backward = 2 x forward, so training = 3 x forward = 6 x MACs. Norms, softmax,
activations, RoPE and the embedding lookup are left out (they are not matmuls).

`counted_training_flops` checks this against torch's own FLOP counter. The two differ by one known
term: backward never computes the gradient of the images, so the patch embedding's backward is 1 x,
not 2 x, its forward (-0.07% of the total for grr-coca-1b, -0.15% for grr-coca).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from grr_train.model.coca import build_model
from grr_train.model.config import PRESETS, ModelConfig, get_config
from grr_train.model.rope import clear_rope_cache

# Label, then the module-name prefixes whose parameters it counts (see CoCa.__init__).
COMPONENTS = (
    ("patch embed", ("vit.patch_embed.",)),
    ("ViT blocks", ("vit.blocks.",)),
    ("ViT final norm", ("vit.norm.",)),
    ("poolers", ("poolers.",)),
    ("projections", ("image_proj.", "text_proj.")),
    ("token embedding", ("token_embed.",)),
    ("unimodal decoder", ("unimodal.",)),
    ("multimodal decoder", ("multimodal.",)),
    ("final norm", ("final_norm.", "text_norm.")),
    ("LM head", ("lm_head.",)),
)


def parameter_table(cfg: ModelConfig) -> dict[str, int]:
    """Trainable parameters per component, counted on a model built on the meta device."""
    model = build_model(cfg, device="meta")
    table = {label: 0 for label, _ in COMPONENTS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        label = next((lbl for lbl, prefixes in COMPONENTS if name.startswith(prefixes)), None)
        if label is None:
            raise RuntimeError(f"parameter {name} belongs to no component of the summary table")
        table[label] += p.numel()
    return table


def _attention_macs(num_q: int, num_kv: int, dim: int) -> int:
    # q projection, k and v projections, scores, weighted values, out projection.
    return num_q * dim * dim + 2 * num_kv * dim * dim + 2 * num_q * num_kv * dim + num_q * dim * dim


def forward_macs(cfg: ModelConfig) -> dict[str, int]:
    """Multiply-adds of one sample's forward pass, per part."""
    d, n, t, q = cfg.width, cfg.num_patches, cfg.context_length, cfg.num_image_queries
    vit_ffn = (3 if cfg.vit_ffn == "geglu" else 2) * n * d * cfg.vit_hidden
    text_ffn = 3 * t * d * cfg.text_hidden
    return {
        "patch embed": n * 3 * cfg.patch_size**2 * d,
        "ViT blocks": cfg.depth * (_attention_macs(n, n, d) + vit_ffn),
        "poolers": _attention_macs(q, n, d) + _attention_macs(1, q, d),
        "projections": 2 * d * d,
        "unimodal decoder": cfg.text_depth * (_attention_macs(t, t, d) + text_ffn),
        "multimodal decoder": cfg.multimodal_depth
        * (_attention_macs(t, t, d) + _attention_macs(t, q, d) + text_ffn),
        "LM head": t * d * cfg.vocab_size,
    }


def flops_per_sample(cfg: ModelConfig) -> int:
    """Training (forward + backward) FLOPs for one image-caption pair: 6 x forward MACs."""
    return 6 * sum(forward_macs(cfg).values())


def counted_training_flops(cfg: ModelConfig, batch_size: int = 1) -> int:
    """torch.utils.flop_counter's count of one forward and backward of `batch_size` samples.

    Run on fake tensors (shapes only, no memory, seconds even for 2B parameters), with dropout off
    and attention through SDPA's math backend: the fused CPU kernel is invisible to the counter,
    the math one dispatches the score and value matmuls it counts. The loss is a stand-in with no
    matmul of its own, so the count is the model's alone, comparable with `flops_per_sample`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode  # the counter's usual companion

    cfg = dataclasses.replace(cfg, dropout=0.0)
    counter = FlopCounterMode(display=False)
    try:
        # RoPE tables already cached by real runs are real tensors: let them in as constants.
        with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.MATH):
            model = build_model(cfg).train()
            images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size)
            ids = torch.randint(2, cfg.vocab_size, (batch_size, cfg.context_length + 1))
            with counter:
                out = model(images, ids)
                (out.logits.float().logsumexp(-1).mean() + (out.image_embed * out.text_embed).sum()).backward()
    finally:
        # Tables made here are fake (shapes only); a real model reading them later would fail.
        clear_rope_cache()
    return counter.get_total_flops()


def preset_overview() -> list[dict]:
    """Every preset's trainable parameters and training FLOPs per sample (`grr model summary`)."""
    return [
        {"preset": name, "total_params": sum(parameter_table(cfg).values()), "flops_per_sample": flops_per_sample(cfg)}
        for name, cfg in PRESETS.items()
    ]


def summarize(preset: str, **overrides) -> dict:
    """Everything `grr model summary` shows, as plain JSON-able data."""
    cfg = get_config(preset, **overrides)
    components = parameter_table(cfg)
    return {
        "preset": preset,
        "total_params": sum(components.values()),
        "components": components,
        "flops_per_sample": flops_per_sample(cfg),
        "forward_macs": forward_macs(cfg),
        "flops_counting": "2 FLOPs per matmul multiply-add (attention scores and values included, dense), "
        "backward = 2 x forward: 6 x forward MACs",
        "config": cfg.to_dict(),
    }


def differences(cfg: ModelConfig, reference: ModelConfig) -> dict:
    """Fields of `cfg` that differ from `reference`, with cfg's values."""
    ref = reference.to_dict()
    return {k: v for k, v in cfg.to_dict().items() if ref[k] != v}
