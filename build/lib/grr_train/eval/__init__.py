"""Evaluation: a run on a split (evaluate), retrieval recall, caption metrics (BLEU-4, CIDEr,
exact match) and the comparison of runs (compare)."""
