"""Image-text retrieval recall@k over a split where an image may carry several captions.

Samples are (image, caption) pairs; several samples can share one image (MSCOCO and
Flickr30K have five captions per image). Retrieval is scored over unique images:

- image to text: for each unique image, a hit at k when any of its captions is among the
  k captions most similar to it;
- text to image: for each caption, a hit at k when its image is among the k unique images
  most similar to it.

Ties are counted against the model: a wrong candidate scoring exactly as high as the best
right one ranks ahead of it, so a model whose embeddings are all equal scores recall
k / num_candidates, never 1.0.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

DEFAULT_KS = (1, 5, 10)


def group_by_image(image_keys: Sequence[Hashable]) -> tuple[torch.Tensor, list[int]]:
    """Map each sample to its unique image.

    Returns `text_to_image` (N,) long, the unique-image index of every sample, and
    `first_sample`, for each unique image the index of the first sample that shows it.
    """
    index: dict[Hashable, int] = {}
    text_to_image, first_sample = [], []
    for i, key in enumerate(image_keys):
        if key not in index:
            index[key] = len(first_sample)
            first_sample.append(i)
        text_to_image.append(index[key])
    return torch.tensor(text_to_image, dtype=torch.long), first_sample


def _ranks_of_best_match(sims: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Per row, how many wrong candidates score at least as high as the best right one.

    sims (R, C) similarities; match (R, C) bool, at least one True per row.
    """
    best_right = sims.masked_fill(~match, float("-inf")).max(dim=1, keepdim=True).values  # (R, 1)
    return ((sims >= best_right) & ~match).sum(dim=1)


def recall_at_k(
    image_embed: torch.Tensor,
    text_embed: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int = 1024,
) -> dict:
    """Recall@k both ways, in percent.

    image_embed (I, D): one row per unique image; text_embed (T, D): one row per caption;
    text_to_image (T,): the image row of each caption. Embeddings are compared by dot
    product (the model's embeddings are L2-normalised, so this is cosine similarity).
    """
    num_images, num_texts = image_embed.shape[0], text_embed.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({num_texts},)")
    if num_texts == 0:
        raise ValueError("recall@k needs at least one caption")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images:
        raise ValueError(f"text_to_image points outside the {num_images} images")
    counts = torch.bincount(text_to_image, minlength=num_images)
    if bool((counts == 0).any()):
        raise ValueError("every image needs at least one caption; drop images without captions")
    image_embed = image_embed.float()
    text_embed = text_embed.float()
    text_to_image = text_to_image.long()

    i2t_ranks = []
    for start in range(0, num_images, chunk):
        rows = torch.arange(start, min(start + chunk, num_images))
        sims = image_embed[rows] @ text_embed.T  # (r, T)
        match = text_to_image.unsqueeze(0) == rows.unsqueeze(1)
        i2t_ranks.append(_ranks_of_best_match(sims, match))
    t2i_ranks = []
    for start in range(0, num_texts, chunk):
        rows = torch.arange(start, min(start + chunk, num_texts))
        sims = text_embed[rows] @ image_embed.T  # (r, I)
        match = torch.zeros_like(sims, dtype=torch.bool)
        match[torch.arange(len(rows)), text_to_image[rows]] = True
        t2i_ranks.append(_ranks_of_best_match(sims, match))
    i2t = torch.cat(i2t_ranks)
    t2i = torch.cat(t2i_ranks)

    out: dict = {"num_images": num_images, "num_texts": num_texts}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * int((i2t < k).sum()) / num_images
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * int((t2i < k).sum()) / num_texts
    return out
