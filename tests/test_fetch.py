"""`grr data fetch` end to end through img2dataset, offline: the bundled sample through the CLI, and
cc12m and mscoco against small stand-ins served on 127.0.0.1. img2dataset really runs; its start-up
(spawned processes importing torch and albumentations, ~4 s each) is most of the time, so the sample
goes through the full spawned path and cc12m / mscoco skip only the worker pool (`no_worker_pool`)."""

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import typer
from fetch_helpers import no_worker_pool, read_split  # noqa: F401  (no_worker_pool: a fixture)
from PIL import Image
from typer.testing import CliRunner

from grr_cli.fetch import fetch_command  # noqa: F401  (registers `fetch` into data_app)
from grr_cli.groups import data_app
from grr_data.fetch import FetchOptions, fetch
from grr_data.fetch.loopback import serve_directory


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    out = tmp_path_factory.mktemp("sample") / "out"
    result = CliRunner().invoke(app, ["data", "fetch", "sample", "--out", str(out), "--workers", "1",
                                      "--threads", "4"])
    rerun = CliRunner().invoke(app, ["data", "fetch", "sample", "--out", str(out)])
    return out, result, rerun


@pytest.mark.slow
def test_sample_through_the_cli(sample_run):
    out, result, rerun = sample_run
    assert result.exit_code == 0, result.output
    assert "train: 26 done, 0 failed" in result.output and "val: 5 done" in result.output
    assert "downloading 24 images into 1 shard(s)" in result.output  # labels img2dataset's bare bar
    manifest = json.loads((out / "fetch_manifest.json").read_text())
    assert {s: v["num_samples"] for s, v in manifest["splits"].items()} == {"train": 26, "val": 5}
    assert manifest["tool"]["name"] == "img2dataset" and manifest["tool"]["options"]["image_size"] == 288
    assert not (out / "_work" / "download").exists()  # staging removed once complete
    assert rerun.exit_code == 0 and "already complete" in rerun.output


@pytest.mark.slow  # the sample_run fixture: a whole img2dataset fetch with its spawned processes
def test_sample_images_captions_and_splits(sample_run):
    out = sample_run[0]
    splits = {s: read_split(out / s) for s in ("train", "val")}
    for split, samples in splits.items():
        assert all(min(m["size"]) == 288 for m in samples), split
        assert all(m["source_split"] == split and m["status"] == "success" for m in samples)
    train_ids = {m["image_id"] for m in splits["train"]}
    val_ids = {m["image_id"] for m in splits["val"]}
    assert not train_ids & val_ids
    assert len(train_ids | val_ids) == 24
    per_image = {}
    for m in splits["train"] + splits["val"]:
        per_image.setdefault(m["image_id"], []).append(m["caption"])
    assert any(len(c) >= 2 for c in per_image.values())
    assert "a cup of espresso on a red saucer with a spoon on a wooden table" in per_image["coffee-full"]


def test_a_script_on_stdin_is_refused_not_hung(tmp_path):
    # img2dataset's spawned processes would try to re-import "<stdin>" and the parent would wait forever.
    script = ("from pathlib import Path\nfrom grr_data.fetch import FetchError, FetchOptions, fetch\n"
              f"try:\n    fetch('sample', FetchOptions(out=Path({str(tmp_path / 'out')!r})))\n"
              "except FetchError as err:\n    print('refused:', err)\n")
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "<stdin>" in done.stdout and "grr data fetch" in done.stdout
    assert not (tmp_path / "out" / "fetch_manifest.json").exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    for i, (size, fmt) in enumerate([((640, 480), "JPEG"), ((300, 500), "PNG"), ((288, 288), "JPEG")]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(root / f"img{i}.{fmt.lower()}", format=fmt)
    (root / "notimage.jpg").write_text("<html>this is not a picture</html>")
    with serve_directory(root) as base_url:
        yield base_url


@pytest.mark.usefixtures("no_worker_pool")
def test_cc12m_counts_failures_by_reason(server, tmp_path):
    tsv = tmp_path / "cc12m.tsv"
    lines = [f"{server}/img0.jpeg\ta red room", f"{server}/img1.png\ta tall picture",
             f"{server}/img2.jpeg\ta square", f"{server}/missing.jpg\tgone",
             f"{server}/notimage.jpg\ta web page", "a line without a tab"]
    tsv.write_text("\n".join(lines) + "\n")
    data = fetch("cc12m", FetchOptions(out=tmp_path / "out", source=tsv, workers=1, threads=4, retries=0))
    split = data["splits"]["all"]
    assert split["num_samples"] == 3 and split["num_attempted"] == 5
    assert split["failures"] == {"http_404": 1, "not_an_image": 1}
    assert any("1 malformed lines skipped" in w for w in data["warnings"])
    samples = read_split(tmp_path / "out")
    assert sorted(m["caption"] for m in samples) == ["a red room", "a square", "a tall picture"]
    assert all(min(m["size"]) == 288 for m in samples)
    assert (tmp_path / "out" / "00000.parquet").exists() and (tmp_path / "out" / "00000_stats.json").exists()
    manifest = json.loads((tmp_path / "out" / "fetch_manifest.json").read_text())
    assert manifest["sources"][0]["sha256"] and manifest["tool"]["version"]


@pytest.mark.usefixtures("no_worker_pool")
def test_mscoco_fetches_each_image_once_and_writes_pairs(server, tmp_path):
    source = tmp_path / "annotations"
    source.mkdir()
    captions = {"train": {0: ("img0.jpeg", 5), 1: ("img1.png", 2), 2: ("gone.jpg", 3)}, "val": {9: ("img2.jpeg", 2)}}
    for split, images in captions.items():
        anns = [{"id": 100 * i + k, "image_id": i, "caption": f" caption {k} of {i} "}
                for i, (_, n) in images.items() for k in range(n)]
        data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "coco_url": f"{server}/{name}"}
                           for i, (name, _) in images.items()], "annotations": anns}
        (source / f"captions_{split}2017.json").write_text(json.dumps(data))
    data = fetch("mscoco", FetchOptions(out=tmp_path / "out", source=source, workers=1, threads=4, retries=0))
    assert data["splits"]["train"]["num_samples"] == 7
    assert data["splits"]["train"]["failures"] == {"http_404": 3}  # counted in pairs: the image had 3 captions
    assert data["splits"]["val"]["num_samples"] == 2
    train = read_split(tmp_path / "out" / "train")
    assert sorted(m["image_id"] for m in train) == ["0"] * 5 + ["1"] * 2
    assert {m["caption"] for m in train if m["image_id"] == "1"} == {"caption 0 of 1", "caption 1 of 1"}
    assert all(min(m["size"]) == 288 for m in train)
    assert {m["image_id"] for m in read_split(tmp_path / "out" / "val")} == {"9"}
    assert not (tmp_path / "out" / "_work" / "download").exists()
    shutil.rmtree(tmp_path / "out")


class _HeldHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files only once `release` is set; `requested` tells the test a download has started."""

    requested = threading.Event()
    release = threading.Event()

    def do_GET(self):  # noqa: N802  (the base class's name)
        type(self).requested.set()
        type(self).release.wait(timeout=60)
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.mark.slow  # two img2dataset runs with their spawned processes
def test_ctrl_c_exits_130_and_a_rerun_continues(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (320, 300), (60 * i, 90, 120)).save(root / f"img{i}.jpg")
    handler = type("Held", (_HeldHandler,), {"requested": threading.Event(), "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("".join(f"{base}/img{i}.jpg\tpicture {i}\n" for i in range(4)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "grr_cli.main", "data", "fetch", "cc12m", "--from", str(tsv), "--out", str(out),
               "--workers", "1", "--threads", "2", "--retries", "0", "--timeout", "30", "--shard-size", "2"]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    try:
        # its own process group, as a shell gives a foreground job: Ctrl-C signals the whole group
        proc = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            assert handler.requested.wait(timeout=120), "img2dataset never started downloading"
            os.killpg(proc.pid, signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            handler.release.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 130, stdout + stderr
        assert "interrupted" in stderr and "rerun the same command to continue" in stderr
        assert not (out / "fetch_manifest.json").exists()
        assert not (out / ".grr.lock").exists()  # Ctrl-C released the folder's lock
        rerun = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert rerun.returncode == 0, rerun.stderr
    assert "all: 4 done, 0 failed" in rerun.stdout
    assert sorted(m["caption"] for m in read_split(out)) == [f"picture {i}" for i in range(4)]
