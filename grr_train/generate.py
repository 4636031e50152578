"""Caption generation: greedy, beam search and top-k / top-p sampling over the model's KV cache.

Every method starts from BOS and feeds `model.decode(image_tokens, new_ids, cache)` only
the tokens chosen at the last step, so a step costs one position, not the whole prefix
(`use_cache=False` recomputes the prefix each step: the slow reference the tests compare
against). BOS, CLS and PAD are never generated; EOS is banned until `min_len` caption tokens
stand and forced once `max_len` do. Outputs are word ids (the layout's name for the caption
tokens between BOS and EOS), turned into text with the tokenizer's `decode_words`.

Beam search keeps `beams` hypotheses per image, ranks finished ones by their summed log
probability divided by their length in tokens (EOS included), and stops once `beams`
hypotheses have ended or at `max_len`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from grr_data.layout import SEQ_LEN

# BOS, the words and EOS must stand before the CLS position (grr_data.layout).
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


@torch.no_grad()
def _beam_search_one(model, image_tokens, special, options: DecodeOptions) -> list[int]:
    """Beam search for one image; image_tokens (1, N, D)."""
    k, device = options.beams, image_tokens.device
    image_tokens = image_tokens.expand(k, *image_tokens.shape[1:])
    seqs = torch.full((k, 1), special.bos, dtype=torch.long, device=device)
    # all beams start equal: only the first may expand at the first step
    scores = torch.full((k,), float("-inf"), device=device)
    scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []
    logp, cache = _step(model, image_tokens, seqs, seqs, None, options.use_cache)
    for num_words in range(options.max_len + 1):
        logp = _constrain(logp, special, num_words, options)
        vocab = logp.shape[-1]
        candidates = (scores[:, None] + logp).flatten()
        top_scores, top_index = torch.topk(candidates, 2 * k)
        keep_beam, keep_token, keep_score = [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist(), strict=True):
            if score == float("-inf"):
                break
            beam, token = divmod(index, vocab)
            if token == special.eos:
                words = seqs[beam, 1:].tolist()
                finished.append((score / (len(words) + 1), words))
            else:
                keep_beam.append(beam)
                keep_token.append(token)
                keep_score.append(score)
            if len(keep_beam) == k:
                break
        if len(finished) >= k or not keep_beam:
            break
        beam_index = torch.tensor(keep_beam, device=device)
        tokens = torch.tensor(keep_token, device=device)
        seqs = torch.cat([seqs[beam_index], tokens[:, None]], dim=1)
        scores = torch.tensor(keep_score, device=device)
        if len(keep_beam) < k:  # fewer live hypotheses than beams: pad with dead copies
            pad = k - len(keep_beam)
            beam_index = torch.cat([beam_index, beam_index[:1].expand(pad)])
            seqs = torch.cat([seqs, seqs[:1].expand(pad, -1)])
            scores = torch.cat([scores, torch.full((pad,), float("-inf"), device=device)])
        if options.use_cache:
            cache = map_cache(cache, lambda t, idx=beam_index: t.index_select(0, idx) if t.shape[:1] == (k,) else t)
        logp, cache = _step(model, image_tokens, seqs, seqs[:, -1:], cache, options.use_cache)
    return max(finished, key=lambda item: item[0])[1]


@torch.no_grad()
def generate_from_tokens(model, image_tokens: torch.Tensor, special, options: DecodeOptions) -> list[list[int]]:
    """Word ids of one caption per image; image_tokens (B, N, D) from `model.encode_image`."""
    options.check()
    if options.beams > 1:
        return [_beam_search_one(model, image_tokens[i : i + 1], special, options) for i in range(image_tokens.shape[0])]
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
