"""Caption generation: greedy, beam search and top-k / top-p sampling over the model's KV cache.

Every method starts from BOS and feeds `model.decode(image_tokens, new_ids, cache)` only
the tokens chosen at the last step, so a step costs one position, not the whole prefix
(`use_cache=False` recomputes the prefix each step: the slow reference the tests compare
against). BOS, CLS and PAD are never generated; EOS is banned until `min_len` caption tokens
stand and forced once `max_len` do. Outputs are word ids (the layout's name for the caption
tokens between BOS and EOS), turned into text with the tokenizer's `decode_words`.

Beam search keeps `beams` hypotheses per image, ranks finished ones by their summed log
probability divided by their length in tokens (EOS included), and stops once `beams`
hypotheses have ended or at `max_len`. All images of a call are searched together, their
hypotheses one batch; the cache follows the surviving hypotheses by `index_select` on its
batch dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from grr_data.format.layout import SEQ_LEN

# BOS, the words and EOS must stand before the CLS position (grr_data.format.layout).
MAX_WORDS = SEQ_LEN - 4


@dataclass
class DecodeOptions:
    beams: int = 1
    top_k: int | None = None  # sample from the k most likely tokens
    top_p: float | None = None  # sample from the smallest set holding probability p
    temperature: float = 1.0
    min_len: int = 1  # caption tokens (sentence pieces), EOS not counted
    max_len: int = 30  # caption tokens
    seed: int | None = None
    use_cache: bool = True

    @property
    def sampling(self) -> bool:
        return self.top_k is not None or self.top_p is not None

    def check(self) -> None:
        if self.beams < 1:
            raise ValueError(f"beams must be at least 1, got {self.beams}")
        if self.beams > 1 and self.sampling:
            raise ValueError("choose beam search or sampling (--top-k/--top-p), not both")
        if not 1 <= self.max_len <= MAX_WORDS:
            raise ValueError(f"max_len must be between 1 and {MAX_WORDS} tokens, got {self.max_len}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len must be between 0 and max_len ({self.max_len}), got {self.min_len}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def describe(self) -> str:
        if self.beams > 1:
            how = f"beam search, {self.beams} beams"
        elif self.sampling:
            parts = [f"top-k {self.top_k}" if self.top_k else "", f"top-p {self.top_p}" if self.top_p else ""]
            how = f"sampling ({', '.join(p for p in parts if p)}, temperature {self.temperature}, seed {self.seed})"
        else:
            how = "greedy"
        return f"{how}, {self.min_len}-{self.max_len} tokens"


def map_cache(cache, fn):
    """Apply `fn` to every tensor of a nested cache (dataclasses, dicts, lists, tuples)."""
    if isinstance(cache, torch.Tensor):
        return fn(cache)
    if dataclasses.is_dataclass(cache) and not isinstance(cache, type):
        return dataclasses.replace(cache, **{f.name: map_cache(getattr(cache, f.name), fn) for f in dataclasses.fields(cache)})
    if isinstance(cache, dict):
        return {k: map_cache(v, fn) for k, v in cache.items()}
    if isinstance(cache, (list, tuple)):
        return type(cache)(map_cache(v, fn) for v in cache)
    return cache


def _step(model, image_tokens, seqs, new_tokens, cache, use_cache):
    """Log-probabilities of the next token: (B, V) float32, and the updated cache."""
    if use_cache:
        logits, cache = model.decode(image_tokens, new_tokens, cache)
    else:
        logits, _ = model.decode(image_tokens, seqs, None)
    return torch.log_softmax(logits[:, -1].float(), dim=-1), cache


def _constrain(logp: torch.Tensor, special, num_words: int, options: DecodeOptions) -> torch.Tensor:
    logp = logp.clone()
    logp[:, [special.bos, special.cls, special.pad]] = float("-inf")
    if num_words < options.min_len:
        logp[:, special.eos] = float("-inf")
    if num_words >= options.max_len:
        eos = logp[:, special.eos].clone()
        logp.fill_(float("-inf"))
        logp[:, special.eos] = eos.clamp_min(-1e4)  # forced even where the model calls it impossible
    return logp


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p; the first always stays
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def _greedy_or_sample(model, image_tokens, special, options: DecodeOptions) -> list[list[int]]:
    batch, device = image_tokens.shape[0], image_tokens.device
    generator = None
    if options.sampling:
        generator = torch.Generator(device=device)
        generator.manual_seed(options.seed if options.seed is not None else torch.seed())
    seqs = torch.full((batch, 1), special.bos, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logp, cache = _step(model, image_tokens, seqs, seqs, None, options.use_cache)
    for num_words in range(options.max_len + 1):
        logp = _constrain(logp, special, num_words, options)
        if options.sampling:
            logits = _filter_top_k_top_p(logp / options.temperature, options.top_k, options.top_p)
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        else:
            token = logp.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, special.pad), token)
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        finished |= token == special.eos
        if bool(finished.all()):
            break
        logp, cache = _step(model, image_tokens, seqs, token[:, None], cache, options.use_cache)
    return [_words(row, special) for row in seqs.tolist()]


def _words(row: list[int], special) -> list[int]:
    out = []
    for token in row[1:]:
        if token in (special.eos, special.pad):
            break
        out.append(token)
    return out


def reorder_cache(cache, index: torch.Tensor, with_context: bool):
    """The cache's rows (B, ...) picked by `index`: `index_select` along the batch dim, no deep copy.

    The image tokens' cross-attention keys and values (`cross_kv`) are the same for every row of
    an image, so while `index` only moves rows between the beams of one image they stay as they
    are; `with_context` reorders them too (when finished images leave the batch)."""
    rows = cache.key_valid.shape[0]

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index) if t.ndim and t.shape[0] == rows else t

    changes = {f.name: map_cache(getattr(cache, f.name), pick) for f in dataclasses.fields(cache)
               if with_context or f.name != "cross_kv"}
    return dataclasses.replace(cache, **changes)


@torch.no_grad()
def _beam_search(model, image_tokens, special, options: DecodeOptions) -> list[list[int]]:
    """Beam search for B images at once; image_tokens (B, N, D).

    The `beams` hypotheses of every image still searching form one batch (row a * k + j: the
    a-th such image, beam j), so each step is one `decode` call whatever the number of images.
    Each image ranks and stops on its own, exactly as if it were searched alone; an image that
    has finished leaves the batch."""
    k, device = options.beams, image_tokens.device
    neg_inf = float("-inf")
    image_tokens = image_tokens.repeat_interleave(k, dim=0)  # (B * k, N, D)
    active = list(range(image_tokens.shape[0] // k))  # images still searching, in row order
    seqs = torch.full((len(active) * k, 1), special.bos, dtype=torch.long, device=device)
    # all beams start equal: only the first of each image may expand at the first step
    scores = torch.full((len(active), k), neg_inf, device=device)
    scores[:, 0] = 0.0
    scores = scores.flatten()
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in active]
    logp, cache = _step(model, image_tokens, seqs, seqs, None, options.use_cache)
    for num_words in range(options.max_len + 1):
        logp = _constrain(logp, special, num_words, options)
        vocab = logp.shape[-1]
        candidates = (scores[:, None] + logp).view(len(active), k * vocab)
        top_scores, top_index = torch.topk(candidates, 2 * k, dim=1)
        prefixes = seqs[:, 1:].tolist()
        still, rows, tokens, new_scores = [], [], [], []
        for a, (image, row_scores, row_index) in enumerate(
            zip(active, top_scores.tolist(), top_index.tolist(), strict=True)
        ):
            keep = []  # (row, token, score) of the live hypotheses this image keeps
            for score, index in zip(row_scores, row_index, strict=True):
                if score == neg_inf:
                    break
                beam, token = divmod(index, vocab)
                if token == special.eos:
                    words = prefixes[a * k + beam]
                    finished[image].append((score / (len(words) + 1), words))
                else:
                    keep.append((a * k + beam, token, score))
                if len(keep) == k:
                    break
            if len(finished[image]) >= k or not keep:
                continue  # this image is done
            # fewer live hypotheses than beams: pad with dead copies of the first
            keep += [(keep[0][0], keep[0][1], neg_inf)] * (k - len(keep))
            still.append(image)
            for row, token, score in keep:
                rows.append(row)
                tokens.append(token)
                new_scores.append(score)
        if not still:
            break
        index = torch.tensor(rows, device=device)
        seqs = torch.cat([seqs.index_select(0, index), torch.tensor(tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device)
        shrinking = len(still) < len(active)
        if shrinking:
            image_tokens = image_tokens.index_select(0, index)
        if options.use_cache:
            cache = reorder_cache(cache, index, with_context=shrinking)
        active = still
        logp, cache = _step(model, image_tokens, seqs, seqs[:, -1:], cache, options.use_cache)
    return [max(f, key=lambda item: item[0])[1] for f in finished]


@torch.no_grad()
def generate_from_tokens(model, image_tokens: torch.Tensor, special, options: DecodeOptions) -> list[list[int]]:
    """Word ids of one caption per image; image_tokens (B, N, D) from `model.encode_image`."""
    options.check()
    if options.beams > 1:
        return _beam_search(model, image_tokens, special, options)
    return _greedy_or_sample(model, image_tokens, special, options)


@torch.no_grad()
def generate(model, images: torch.Tensor, special, options: DecodeOptions | None = None) -> list[list[int]]:
    """Word ids of one caption per image; images (B, 3, H, W) normalised as the loader does."""
    options = options or DecodeOptions()
    was_training = model.training
    model.eval()
    try:
        _, image_tokens = model.encode_image(images)
        return generate_from_tokens(model, image_tokens, special, options)
    finally:
        model.train(was_training)
