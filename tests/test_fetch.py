"""`grr data fetch` end to end through img2dataset, offline: the bundled sample through the CLI, and
cc12m and mscoco against small stand-ins served on 127.0.0.1. img2dataset really runs; its start-up
(its spawned logger process importing torch and albumentations, ~4 s) is most of the time, so the
sample and the stop-signal tests go through the full path and cc12m / mscoco skip only the worker
pool (`no_worker_pool`)."""

import functools
import http.server
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import typer
from fetch_helpers import left_running, no_worker_pool, read_split, running, running_in_group  # noqa: F401  (a fixture)
from PIL import Image
from typer.testing import CliRunner

from grr_cli.fetch import fetch_command  # noqa: F401  (registers `fetch` into data_app)
from grr_cli.groups import data_app
from grr_data.fetch import FetchOptions, fetch, img2ds
from grr_data.fetch.loopback import serve_directory
from grr_data.format.records import iter_tar_samples
from grr_data.infra.procs import WorkerPool


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


class _HoldingSecondShard(http.server.SimpleHTTPRequestHandler):
    """Serves img0 and img1 (the first shard) at once, the others only once `release` is set;
    `held` gets the path of each request held."""

    held: queue.Queue
    release: threading.Event

    def do_GET(self):  # noqa: N802  (the base class's name)
        if self.path not in ("/img0.jpg", "/img1.jpg"):
            type(self).held.put(self.path)
            type(self).release.wait(timeout=60)
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002
        pass


class _HeldFetch:
    """`grr data fetch cc12m` of 4 images in 2 shards by 3 workers, in a process group of its own,
    from a local server holding the second shard's downloads: `start()` returns once the first shard
    is done, the second is downloading and a worker waits for work."""

    REPO = Path(__file__).resolve().parent.parent
    ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}

    def __init__(self, tmp_path: Path):
        root = tmp_path / "www"
        root.mkdir()
        for i in range(4):
            Image.new("RGB", (320, 300), (60 * i, 90, 120)).save(root / f"img{i}.jpg")
        self.handler = type("Held", (_HoldingSecondShard,), {"held": queue.Queue(), "release": threading.Event()})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(self.handler, directory=str(root)))
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client stopped mid-download
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.tsv = tmp_path / "cc12m.tsv"
        self.tsv.write_text("".join(f"{base}/img{i}.jpg\tpicture {i}\n" for i in range(4)))
        self.out = tmp_path / "out"
        self.proc: subprocess.Popen | None = None

    def command(self, folder: Path) -> list[str]:
        return [sys.executable, "-m", "grr_cli.main", "data", "fetch", "cc12m", "--from", str(self.tsv), "--out",
                str(folder), "--workers", "3", "--threads", "2", "--retries", "0", "--timeout", "30",
                "--shard-size", "2"]

    def start(self, command: list[str] | None = None) -> list[int]:
        """Start it (`command`: another than the CLI's); returns the processes of its group then
        (the fetch and img2dataset's)."""
        self.proc = subprocess.Popen(command or self.command(self.out), cwd=self.REPO, env=self.ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        for _ in range(2):  # both downloads of the second shard have started
            self.handler.held.get(timeout=120)
        deadline = time.monotonic() + 60
        while not (self.out / "00000_stats.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (self.out / "00000_stats.json").exists(), "the first shard never finished"
        processes = running_in_group(self.proc.pid)
        assert len(processes) > 1, processes
        return processes

    def run(self, folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(folder), cwd=self.REPO, env=self.ENV, capture_output=True, text=True,
                              timeout=300)

    def close(self) -> None:
        self.handler.release.set()
        if self.proc is not None and running_in_group(self.proc.pid):  # not for the next test to meet
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.server.shutdown()
        self.server.server_close()


def _samples(out: Path) -> dict:
    """Each tar's samples (key, members), by key: img2dataset writes them in the order they arrive."""
    return {tar.name: sorted(iter_tar_samples(tar), key=lambda sample: sample[0]) for tar in sorted(out.glob("*.tar"))}


@pytest.mark.slow  # three img2dataset runs, each with its spawned logger process
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to list the fetch's processes")
@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-process", "to-its-group"])
def test_sigterm_stops_an_img2dataset_fetch_and_leaves_no_process(tmp_path, to_group):
    """SIGTERM, as Slurm or Kubernetes sends it, mid-fetch with one shard done, one downloading and a
    worker waiting for work. Old code: killed outright (exit -15, the lock left; sent to the process
    alone, img2dataset's logger and workers outlived it). img2dataset's own pool, given a SIGTERM
    handler in the main process only, hung in its terminate() when the group got the signal (LOG)."""
    held = _HeldFetch(tmp_path)
    out = held.out
    try:
        processes = held.start()
        (os.killpg if to_group else os.kill)(held.proc.pid, signal.SIGTERM)
        stdout, stderr = held.proc.communicate(timeout=60)
        assert held.proc.returncode == 143, stdout + stderr
        assert stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM: the fetch into {out} was interrupted. "
                                                   "Finished shards are kept; rerun the same command to continue.")
        assert "Traceback" not in stderr
        assert left_running(held.proc.pid, processes) == []
        assert not (out / ".grr.lock").exists() and not (out / "fetch_manifest.json").exists()
        assert not (out / "_tmp").exists()  # img2dataset's temporary folder, removed as on Ctrl-C
        assert (out / "00000_stats.json").exists() and not (out / "00001_stats.json").exists()
        first_shard = (out / "00000.tar").read_bytes()
        held.handler.release.set()
        rerun, unbroken = held.run(out), held.run(tmp_path / "unbroken")
    finally:
        held.close()
    assert rerun.returncode == 0 and unbroken.returncode == 0, rerun.stderr + unbroken.stderr
    assert "all: 4 done, 0 failed" in rerun.stdout
    assert (out / "00000.tar").read_bytes() == first_shard  # kept, not fetched again
    assert _samples(out) == _samples(tmp_path / "unbroken")
    assert sorted(m["caption"] for m in read_split(out)) == [f"picture {i}" for i in range(4)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has ended
        return b""


PYTHON_CALLER = """
import sys
from pathlib import Path
from grr_data.fetch import FetchError, FetchOptions, fetch
try:
    fetch("cc12m", FetchOptions(out=Path(sys.argv[2]), source=Path(sys.argv[1]), workers=3, threads=2, retries=0,
                                timeout=30, shard_size=2))
except FetchError as err:
    print("caught:", err, flush=True)
    sys.stdin.read()  # the caller lives on until the test closes its stdin
"""


@pytest.mark.slow  # two img2dataset runs
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to list the fetch's processes")
def test_a_dead_download_worker_is_a_fetch_error_and_leaves_the_caller_no_process(tmp_path):
    """A worker killed mid-shard (the OOM killer), under a Python caller that goes on. Old code:
    img2dataset's pool lost that shard's task and waited for it forever. Without ending the
    processes img2dataset started, its logger process ran on beside the caller."""
    held = _HeldFetch(tmp_path)
    try:
        processes = held.start([sys.executable, "-c", PYTHON_CALLER, str(held.tsv), str(held.out)])
        cmdlines = {pid: _cmdline(pid) for pid in processes}
        workers = [pid for pid in processes  # forked: the caller's command line
                   if pid != held.proc.pid and cmdlines[pid] == cmdlines[held.proc.pid]]
        assert len(workers) == 3, processes
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        ready, _, _ = select.select([held.proc.stdout], [], [], 60)
        assert ready, "the fetch neither finished nor failed in 60 s after its workers were killed"
        line = held.proc.stdout.readline()
        assert line.startswith("caught: worker process ") and "killed by SIGKILL" in line, line
        assert "rerun the same command" in line
        # multiprocessing's resource tracker serves the caller's whole life (and ends with it)
        tracker = [pid for pid in processes if b"resource_tracker" in cmdlines[pid]]
        assert left_running(held.proc.pid, processes, but=(held.proc.pid, *tracker)) == []
        assert not (held.out / ".grr.lock").exists()
        _, stderr = held.proc.communicate("", timeout=60)
        assert held.proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
        held.handler.release.set()
        rerun = held.run(held.out)
    finally:
        held.close()
    assert rerun.returncode == 0 and "all: 4 done, 0 failed" in rerun.stdout, rerun.stderr


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_pool_worker_is_replaced_after_its_maximum_of_items():
    """`max_items_per_worker`, multiprocessing.Pool's maxtasksperchild, which img2dataset's pool had
    (5 shards): each worker process does at most that many items; results stay in order."""
    with WorkerPool(_pid_after, 2, max_items_per_worker=3) as pool:
        pids = list(pool.imap([0.01] * 11))
        workers = [pid for pid, _ in pool._workers]
    per_process = Counter(pids)
    assert max(per_process.values()) <= 3 and len(per_process) >= 4, per_process  # 11 items, 3 each at most
    assert os.getpid() not in per_process and not any(map(running, [*per_process, *workers]))


def test_img2dataset_shards_run_once_each_and_failed_ones_are_retried(tmp_path, capsys):
    """grr's distributor (forked workers, grr_data.fetch.img2ds.distribute_shards) does what
    img2dataset's own did: every shard once, failed ones again up to `max_shard_retry` times."""
    calls = tmp_path / "calls"

    def downloader(row):  # img2dataset's Downloader: (ok, row); shard 1 fails once, shard 3 always
        with open(calls, "a") as f:
            f.write(f"{row[0]}\n")
        tries = calls.read_text().split().count(str(row[0]))
        return (row[0] != 3 and not (row[0] == 1 and tries == 1)), row

    rows = [(i, f"shard-{i}.feather") for i in range(5)]
    img2ds.distribute_shards(2, downloader, iter(rows), None, 2)
    assert Counter(calls.read_text().split()) == {"0": 1, "1": 2, "2": 1, "3": 3, "4": 1}
    assert "1 shards still failed after 2 retries" in capsys.readouterr().out


def test_an_img2dataset_without_the_distributor_grr_replaces_is_a_clear_error(monkeypatch):
    import importlib

    from grr_data.fetch.common import FetchError

    main = importlib.import_module("img2dataset.main")
    monkeypatch.delattr(main, "multiprocessing_distributor")
    with pytest.raises(FetchError, match=r"^img2dataset \S+ has no img2dataset\.main\.multiprocessing_distributor, "
                                         r".*pip install 'img2dataset==1\.47\.0'$"):
        with img2ds._img2dataset_processes():
            pass
