"""The Contrastive Captioner: ViT -> cascaded poolers -> image embedding and image tokens;
unimodal decoder -> text embedding at CLS; multimodal decoder -> caption logits (paper 3.3).

Outside its transformer blocks the forward is a few named steps (`REGIONS`: the ViT's stem, the
image head, the text inputs and mask, the text embedding, the image tokens' cross-attention keys
and values, the caption head), so `grr_train.runtime.parallel` can compile each as one graph beside the
per-block ones; the data-dependent part (trimming's one host read) stays between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from grr_train.model.attention import additive_mask, attention_dtype
from grr_train.model.config import ModelConfig
from grr_train.model.head_loss import linear_cross_entropy_sum
from grr_train.model.norms import RMSNorm
from grr_train.model.poolers import CascadedPoolers
from grr_train.model.text import TextDecoder, decoder_mask
from grr_train.model.vit import VisionTransformer


@dataclass
class CocaOutput:
    image_embed: torch.Tensor  # (B, D) L2-normalised
    text_embed: torch.Tensor  # (B, D) L2-normalised
    logits: torch.Tensor | None  # (B, T, V) caption logits for `targets(ids)`; None when caption_sum is given
    image_tokens: torch.Tensor  # (B, Q, D) the generative pooler's tokens (what captions cross-attend to)
    # (T,) the input positions the logits are for, increasing; None: all 64 (no trimming)
    positions: torch.Tensor | None = None
    # The summed caption token loss (float32 scalar), from a forward asked for it (`caption_loss_ignoring`)
    caption_sum: torch.Tensor | None = None

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        """The targets (B, T) that `logits` predict, from the laid-out ids (B, 65)."""
        return caption_targets(ids, self.positions)


def caption_targets(ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The caption targets of logits at input `positions` (None: all 64), from laid-out ids (B, 65):
    ids[:, 1:] at those positions. Every loss pairs logits with targets through this."""
    targets = ids[:, 1:]
    return targets if positions is None else targets[:, positions]


@dataclass
class DecodeCache:
    """What `CoCa.decode` keeps between steps."""

    key_valid: torch.Tensor  # (B, L) False at PAD positions of the L tokens seen so far
    eos_seen: torch.Tensor  # (B,) whether an EOS is among them
    cross_kv: list  # per multimodal block: image-token keys and values, computed once
    unimodal: list[dict] = field(default_factory=list)  # per block: self-attention "k", "v" (B, H, L, hd)
    multimodal: list[dict] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.key_valid.shape[1]


# The forward's steps outside the transformer blocks, as attribute paths of a CoCa: what
# `grr_train.runtime.parallel.compile_regions` compiles, one graph each.
REGIONS = ("vit.embed", "image_head", "text_inputs", "text_embedding", "multimodal.context_keys_values",
           "caption_logits", "caption_loss_sum")


class CoCa(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.vit = VisionTransformer(cfg)
        self.poolers = CascadedPoolers(d, cfg.heads, cfg.num_image_queries, cfg.dropout)
        self.image_proj = nn.Linear(d, d)
        self.text_proj = nn.Linear(d, d)
        self.token_embed = nn.Embedding(cfg.vocab_size, d)
        self.unimodal = TextDecoder(
            d, cfg.heads, cfg.text_depth, cfg.text_hidden, cfg.dropout, False, cfg.rope_theta
        )
        self.multimodal = TextDecoder(
            d, cfg.heads, cfg.multimodal_depth, cfg.text_hidden, cfg.dropout, True, cfg.rope_theta
        )
        # The one 768-vector the paper's totals leave (docs/DESIGN.md, "Parameter counts") is this norm before the LM head;
        # the unimodal CLS output and the pooled image token are therefore normalised without
        # parameters. Without the image one, the pooled token starts tiny (two 0.02-init linears)
        # and the L2 normalisation after the projection turns that into gradients of ~1e4.
        self.final_norm = RMSNorm(d)
        self.text_norm = RMSNorm(d, affine=False)
        self.image_norm = RMSNorm(d, affine=False)
        # Untied, with a bias: the totals count a second 32,102 x 768 matrix plus 32,102 biases.
        self.lm_head = nn.Linear(d, cfg.vocab_size)
        # The vocabulary the fused caption loss runs the head at (grr_train.runtime.parallel.align_widths).
        self.padded_vocab = cfg.vocab_size
        self.apply(_init_weights)
        nn.init.normal_(self.poolers.queries, std=0.02)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The 64 model inputs from laid-out ids (B, 65) (or the inputs themselves, (B, 64))."""
        n = self.cfg.context_length
        if ids.ndim != 2 or ids.shape[1] not in (n, n + 1):
            raise ValueError(f"ids have shape {tuple(ids.shape)}; expected (B, {n + 1}) laid-out ids")
        return ids[:, :n]

    def _key_valid(
        self, inputs: torch.Tensor, offset: int = 0, eos_seen: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which inputs (B, T) are keys the text may attend to, and whether each row has seen an EOS.

        PAD positions are those the layout makes padding: after the first EOS, except CLS (and any
        PAD id). Judging by position, not only by id, means whatever id stands at a PAD position
        cannot change an output the losses read (docs/DESIGN.md, "Contracts"); for a valid layout both agree.
        """
        cfg = self.cfg
        is_eos = inputs == cfg.eos_id
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after an EOS of this chunk
        if eos_seen is None:
            eos_seen = torch.zeros(inputs.shape[0], dtype=torch.bool, device=inputs.device)
        after_eos |= eos_seen[:, None]
        positions = torch.arange(offset, offset + inputs.shape[1], device=inputs.device)
        valid = (inputs != cfg.pad_id) & (~after_eos | (positions == cfg.cls_index))
        return valid, eos_seen | is_eos.any(dim=1)

    def image_head(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ViT's tokens (B, N, D) -> (image_embed (B, D) L2-normalised, image_tokens (B, Q, D))."""
        contrastive, image_tokens = self.poolers(patch_tokens)
        return F.normalize(self.image_proj(self.image_norm(contrastive)), dim=-1), image_tokens

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) -> (image_embed (B, D) L2-normalised, image_tokens (B, Q, D))."""
        return self.image_head(self.vit(images))

    def text_inputs(self, inputs: torch.Tensor, key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (B, T, D) of inputs (B, T) and the decoders' additive mask (B, 1, T, T),
        built once for both decoders."""
        x = self.token_embed(inputs)
        return x, additive_mask(decoder_mask(key_valid, inputs.shape[1]), attention_dtype(x))

    def text_embedding(self, hidden: torch.Tensor, cls_at: int | None = None) -> torch.Tensor:
        """The text embedding from the unimodal output, read at CLS (`cls_at`: its index in a trimmed hidden)."""
        cls = self.text_norm(hidden[:, self.cfg.cls_index if cls_at is None else cls_at])  # (B, D)
        return F.normalize(self.text_proj(cls), dim=-1)

    def caption_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The multimodal decoder's output (B, T, D) -> caption logits (B, T, V)."""
        return self.lm_head(self.final_norm(hidden))

    def caption_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_ids: tuple[int, ...]) -> torch.Tensor:
        """The summed caption token loss of the multimodal decoder's output (B, T, D) against targets
        (B, T), without the logits (model/head_loss.py): what `caption_logits` and the caption loss give."""
        return linear_cross_entropy_sum(self.final_norm(hidden), self.lm_head.weight, self.lm_head.bias, targets,
                                        ignore_ids, self.padded_vocab)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Laid-out ids (B, 65) -> text_embed (B, D) L2-normalised: the unimodal output at CLS."""
        inputs = self._check_ids(ids)
        hidden = self.unimodal(self.token_embed(inputs), self._key_valid(inputs)[0])
        return self.text_embedding(hidden)

    def _kept_positions(self, key_valid: torch.Tensor, bucket: int = 1) -> list[int] | None:
        """The positions a trimmed forward runs: [0, L) and CLS onwards, where L is one past the last
        valid position before CLS in any row; None when that is every position. With `bucket` > 1, L
        grows (by positions that are padding in every row) until the count is a multiple of `bucket`,
        so a compiled model sees a few shapes, not one per caption length.

        Reading L is the one host sync trimming costs. Why the result is the untrimmed one at every
        kept position: each dropped position (L .. cls_index - 1) is an invalid key in every row, so
        no kept query attended to it (its attention weight was exactly 0), and it is never a kept
        query whose output is read. The kept positions are increasing, so "key index <= query index"
        over the compacted sequence is the causal mask over the true positions, and each query still
        sees itself. RoPE is given the true positions (CLS keeps 63), so scores are unchanged too.
        For a valid layout (grr_data.format.layout.check_layout) every dropped target is PAD or CLS, which
        the caption loss ignores, so the losses and the token count are unchanged.
        """
        cls = self.cfg.cls_index
        steps = torch.arange(1, cls + 1, device=key_valid.device)  # one past each position before CLS
        length = int((key_valid[:, :cls] * steps).amax())
        tail = key_valid.shape[1] - cls  # CLS and whatever follows it
        length = -(-(length + tail) // bucket) * bucket - tail
        if length >= cls:
            return None
        return list(range(length)) + list(range(cls, key_valid.shape[1]))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, trim_padding: bool = False, trim_bucket: int = 1,
                caption_loss_ignoring: tuple[int, ...] | None = None) -> CocaOutput:
        """images (B, 3, S, S), ids (B, 65): embeddings for eq. 2 and logits (B, 64, V) for eq. 3.

        `trim_padding`: run the text decoders only over the positions some row of the batch uses
        (`_kept_positions`, lengths rounded up to a multiple of `trim_bucket`); the logits are then
        (B, T, V) for `out.positions`, and `out.targets(ids)` gives their targets. Same losses,
        embeddings and gradients as without, up to float rounding (fewer, differently shaped sums)
        and dropout masks (drawn over fewer positions).
        `caption_loss_ignoring` (the target ids the caption loss ignores): return the summed caption
        token loss as `out.caption_sum` instead of the logits (`out.logits` is None), computed with
        the LM head without materialising the logits (`caption_loss_sum`).
        """
        inputs = self._check_ids(ids)
        image_embed, image_tokens = self.image_head(self.vit(images))
        key_valid, _ = self._key_valid(inputs)
        kept = self._kept_positions(key_valid, trim_bucket) if trim_padding else None
        positions, cls_at = None, None
        if kept is not None:
            positions = torch.tensor(kept, device=inputs.device)
            inputs, key_valid = inputs[:, positions], key_valid[:, positions]
            cls_at, kept = kept.index(self.cfg.cls_index), tuple(kept)
        x, mask = self.text_inputs(inputs, key_valid)
        hidden = self.unimodal(x, key_valid, positions=kept, mask=mask)  # (B, T, D)
        text_embed = self.text_embedding(hidden, cls_at)
        context_kv = self.multimodal.context_keys_values(image_tokens)
        hidden = self.multimodal(hidden, key_valid, context_kv=context_kv, positions=kept, mask=mask)
        logits, caption_sum = None, None
        if caption_loss_ignoring is None:
            logits = self.caption_logits(hidden)
        else:
            caption_sum = self.caption_loss_sum(hidden, caption_targets(ids, positions), tuple(caption_loss_ignoring))
        return CocaOutput(image_embed=image_embed, text_embed=text_embed, logits=logits, image_tokens=image_tokens,
                          positions=positions, caption_sum=caption_sum)

    @torch.no_grad()
    def decode(
        self, image_tokens: torch.Tensor, ids_prefix: torch.Tensor, cache: DecodeCache | None = None
    ) -> tuple[torch.Tensor, DecodeCache]:
        """Caption logits (B, T, V) for ids_prefix (B, T), reusing and extending `cache`.

        Without a cache ids_prefix starts at BOS; with one it holds only the new tokens, whose
        RoPE positions continue from `cache.length`. The cache is updated in place and returned.
        For generation only: runs without gradients (training uses `forward`).
        """
        if cache is None:
            b, device = ids_prefix.shape[0], ids_prefix.device
            cache = DecodeCache(
                key_valid=torch.zeros(b, 0, dtype=torch.bool, device=device),
                eos_seen=torch.zeros(b, dtype=torch.bool, device=device),
                cross_kv=self.multimodal.context_keys_values(image_tokens),
                unimodal=[{} for _ in self.unimodal.blocks],
                multimodal=[{} for _ in self.multimodal.blocks],
            )
        new_valid, cache.eos_seen = self._key_valid(ids_prefix, cache.length, cache.eos_seen)
        cache.key_valid = torch.cat([cache.key_valid, new_valid], dim=1)
        hidden = self.unimodal(self.token_embed(ids_prefix), cache.key_valid, caches=cache.unimodal)
        hidden = self.multimodal(hidden, cache.key_valid, context_kv=cache.cross_kv, caches=cache.multimodal)
        return self.lm_head(self.final_norm(hidden)), cache


def _init_weights(module: nn.Module) -> None:
    # GPT-2/ViT-style small normal init; PyTorch's Linear default suits deep transformers poorly.
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> CoCa:
    """A freshly initialised CoCa; `device="meta"` builds it without memory (for counting)."""
    if device is None:
        return CoCa(cfg)
    with torch.device(device):
        return CoCa(cfg)
