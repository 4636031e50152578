"""A process's random-number generator states (torch, CUDA, numpy, Python), saved per rank in
every checkpoint so a resumed run draws what an uninterrupted one does."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(device: torch.device | str | None = None) -> dict:
    """This process's RNG states as tensors and plain values (safe for `weights_only` loading).

    On a CUDA `device`, its generator only: each rank saves the GPU it uses, not every GPU.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "python": random.getstate(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    """Restore `rng_state(device)`; the CUDA state goes to `device`, the GPU this rank uses."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, list):  # saved before per-device states: every GPU's, this rank's by index
            cuda = cuda[torch.device(device).index or 0]
        torch.cuda.set_rng_state(cuda, torch.device(device))
