"""Markers: `slow` (end-to-end, tens of seconds; `pytest -m "not slow"` is the quick loop) and `gpu`
(needs CUDA: skipped here with the reason, run on a GPU machine with `pytest -m gpu`)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run there with `pytest -m gpu`)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (run on one with `pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
