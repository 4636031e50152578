"""A killed `grr data shard` run, restarted, gives byte-identical shards."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from test_shard import make_fetch_output, shard_hashes  # noqa: E402

from grr_data.check import check_dataset  # noqa: E402
from grr_data.shard import shard_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARGS = {"split": "70/30", "shard_size": 3, "progress": False}
KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
from grr_data.shard import shard_dataset
def die(path):
    os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup runs
shard_dataset(sys.argv[1], sys.argv[2], split="70/30", shard_size=3, workers=1, progress=False, on_shard=die)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_fetch_output(root / "in")
    shard_dataset(root / "in", root / "whole", workers=1, **ARGS)
    return root


def test_killed_run_resumes_to_identical_shards(reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_SHARD, str(reference / "in"), str(out)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists() and (out / ".work" / "params.json").is_file()
    done = sorted(p.name for p in out.glob("*/*.tar"))
    assert len(done) == 1
    left_over = sorted(p.name for p in out.glob("*/*.tmp"))
    assert left_over, "the killed run should have left a half-written shard"
    # a kill between the tar's rename and its index's: the tar alone must not count as complete
    later = out / "train" / "shard-000002.tar"
    later.write_bytes(b"partial")

    manifest, stats = shard_dataset(reference / "in", out, workers=2, **ARGS)
    assert stats["kept_shards"] == 1
    assert shard_hashes(out) == shard_hashes(reference / "whole")
    assert manifest["splits"] == json.loads((reference / "whole" / "manifest.json").read_text())["splits"]
    assert not list(out.glob("*/*.tmp")) and not (out / ".work").exists()
    assert check_dataset(out, progress=False).ok


def test_failed_run_resumes_and_other_arguments_are_refused(reference, tmp_path):
    out = tmp_path / "out"
    shards = []

    def fail_after_two(path):
        shards.append(path)
        if len(shards) == 2:
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        shard_dataset(reference / "in", out, workers=1, on_shard=fail_after_two, **ARGS)
    assert not list(out.glob("*/*.tmp"))  # an exception aborts open writers
    with pytest.raises(FileExistsError, match="other arguments"):
        shard_dataset(reference / "in", out, workers=1, **(ARGS | {"shard_size": 4}))
    _, stats = shard_dataset(reference / "in", out, workers=1, **ARGS)
    assert stats["kept_shards"] == 2
    assert shard_hashes(out) == shard_hashes(reference / "whole")
