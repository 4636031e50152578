"""Markers (declared in pyproject.toml, checked with --strict-markers): `slow` (end-to-end, tens of
seconds; `pytest -m "not slow"` is the quick tier), `gpu` (needs CUDA: skipped here with the reason,
run on a GPU machine with `pytest -m gpu`) and `dali` (needs NVIDIA DALI).

A `dali` test skips where DALI is not installed, unless the install asked for DALI: with
`GRR_DALI=cu12` or `cu13` in the environment (what `.ci/run` exports to pytest, after
`scripts/install.sh` was told to install it) a missing DALI fails every `dali` test, so a CI whose
DALI install failed goes red instead of skipping the DALI tests."""

import os

import pytest
import torch

DALI_ASKED = os.environ.get("GRR_DALI", "").strip().lower() in ("cu12", "cu13")


def dali_imports() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


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


def pytest_runtest_setup(item):
    if item.get_closest_marker("dali") is None or dali_imports():
        return
    if DALI_ASKED:
        pytest.fail(f"GRR_DALI={os.environ['GRR_DALI']} asked for DALI, but nvidia.dali does not import: the "
                    "install did not put it in (see scripts/install.sh's output), so the DALI tests cannot run",
                    pytrace=False)
    pytest.skip("nvidia.dali does not import here (pip install nvidia-dali-cuda120; GRR_DALI=cu12 makes its "
                "absence a failure)")
