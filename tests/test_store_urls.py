"""A path with a URL scheme is never taken for a local folder (issue 23): `Path("s3://b/x")` is
`s3:/b/x`, a folder named `s3:` in the working directory. A scheme this grr cannot read or write
is refused in one line, before anything is created; so is a URL that lost its `//` on the way."""

import pytest
from ckpt_helpers import save_checkpoint
from typer.testing import CliRunner

from grr_cli.main import app
from grr_data.format.layout import SpecialIds
from grr_data.format.manifest import Manifest
from grr_data.infra.store import location
from grr_train.model import build_model, get_config

UNSUPPORTED = ["http://example.org/sets/x", "ftp://host/sets/x", "hdfs://nn/sets/x"]


def grr_fails(*args) -> str:
    """The one stderr line of a `grr ARGS` that must fail with exit code 1 and no traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory: a URL taken for a path would leave `http:` (or `ftp:`) in it."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("url", UNSUPPORTED)
def test_shard_out_url_is_refused_and_writes_nothing(cwd, tmp_path, url):
    (tmp_path / "in").mkdir()
    line = grr_fails("data", "shard", "--input", tmp_path / "in", "--out", url)
    assert line.startswith(f"error: {url}: ") and "not supported" in line
    assert list(cwd.iterdir()) == []


def test_shard_input_url_is_refused(cwd):
    line = grr_fails("data", "shard", "--input", "http://example.org/photos", "--out", "out")
    assert line.startswith("error: http://example.org/photos: ") and "must be a local path" in line
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("url", UNSUPPORTED)
def test_check_url_is_refused(cwd, url):
    line = grr_fails("data", "check", url)
    assert line.startswith(f"error: {url}: ") and "not supported" in line
    assert list(cwd.iterdir()) == []


def test_train_data_url_is_refused(cwd):
    line = grr_fails("train", "pretrain", "--preset", "grr-tiny", "--data", UNSUPPORTED[0], "--out", "run",
                     "--max-steps", "1")
    assert line.startswith(f"error: {UNSUPPORTED[0]}: ") and "not supported" in line
    # nor through --set, which never passes through the command line's types
    line = grr_fails("train", "pretrain", "--preset", "grr-tiny", "--set", f"data={UNSUPPORTED[1]}",
                     "--out", "run", "--max-steps", "1")
    assert line.startswith(f"error: {UNSUPPORTED[1]}: ")
    assert list(cwd.iterdir()) == []


def test_train_out_url_is_refused(cwd):
    line = grr_fails("train", "pretrain", "--preset", "grr-tiny", "--out", "http://example.org/runs/a")
    assert line.startswith("error: http://example.org/runs/a: ") and "run folder" in line
    assert list(cwd.iterdir()) == []


@pytest.mark.slow  # ~8 s: a model to save, the evaluator's imports
def test_eval_and_compare_data_url_is_refused(cwd, tmp_path):
    run = tmp_path / "run"
    cfg = get_config("grr-tiny", vocab_size=100)
    meta = {"step": 1, "epoch": 0, "world_size": 1, "model_config": cfg.to_dict(),
            "train_config": {"recipe": "pretrain", "data": "unused", "lambda_con": 1.0, "lambda_cap": 2.0},
            "special": SpecialIds.for_vocab(100).to_dict()}
    save_checkpoint(run, build_model(cfg), {}, meta, keep=1)
    line = grr_fails("eval", run, "--data", UNSUPPORTED[0], "--device", "cpu")
    assert line.startswith(f"error: {UNSUPPORTED[0]}: ") and "not supported" in line
    line = grr_fails("compare", run, run, "--data", UNSUPPORTED[2], "--device", "cpu", "--out", "report")
    assert line.startswith(f"error: {UNSUPPORTED[2]}: ") and "not supported" in line
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("mangled", ["s3:/bucket/sets/x", "gs:/b/x", "http:/example.org/x"])
def test_a_url_that_lost_its_slashes_is_refused(cwd, mangled):
    with pytest.raises(ValueError, match="lost"):
        location(mangled)
    with pytest.raises(ValueError, match="lost"):
        Manifest.read(mangled)
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("path", ["data/x", "/abs/data", "C:/data/x", "a:b/c", "./s3:x"])
def test_local_paths_stay_local(path):
    assert str(location(path)) == str(location(path))  # no error
    assert location(path).parts == __import__("pathlib").Path(path).parts
