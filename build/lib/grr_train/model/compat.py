"""Checkpoints written by older versions of the model: their parameter names, mapped to today's.

Until issue 9, every attention module had `q` (D x D) and `kv` (2D x D) projections. Self-attention
(the ViT blocks and both decoders' `self_attn`) now has one `qkv` (3D x D) whose rows are q's then
kv's, so an old checkpoint's weights load exactly through this mapping; cross-attention (the poolers,
`cross_attn`) keeps `q` and `kv`. Optimizer states are not mapped (their order follows the
parameters): an old run loads for evaluation, captioning and fine-tuning, not for `--resume`.
"""

from __future__ import annotations

import re

import torch

_SELF_ATTENTION_Q = re.compile(r"^(vit\.blocks\.\d+\.attn|(?:unimodal|multimodal)\.blocks\.\d+\.self_attn)\.q\.(weight|bias)$")


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with old separate self-attention q and kv projections merged into `qkv`."""
    out = dict(state)
    for key in list(state):
        match = _SELF_ATTENTION_Q.match(key)
        if match is None:
            continue
        prefix, kind = match.groups()
        kv_key = f"{prefix}.kv.{kind}"
        if kv_key not in state:
            continue
        out[f"{prefix}.qkv.{kind}"] = torch.cat([out.pop(key), out.pop(kv_key)], dim=0)
    return out


def is_old_layout(state_keys) -> bool:
    """Whether parameter names are those from before the merged `qkv` (a run that cannot resume)."""
    return any(_SELF_ATTENTION_Q.match(k) for k in state_keys)
