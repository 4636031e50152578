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


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server on localhost for a test module (tests/s3_server.py)."""
    pytest.importorskip("s3fs", reason="the s3 extra is not installed: pip install 'grr-coca[s3]'")
    pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
    from s3_server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def env(s3, monkeypatch, tmp_path):
    """`s3` as a user's S3-compatible store: AWS_ENDPOINT_URL and credentials in the environment;
    a node cache of the test's own; a short retry budget; no faults left on after the test."""
    for key, value in s3.environ().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GRR_CACHE_DIR", str(tmp_path / "node-cache"))
    monkeypatch.setenv("GRR_STORE_RETRY_S", "20")
    yield s3
    s3.proxy.up()
    s3.proxy.delay_s = 0
    s3.proxy.slowdown(0)
