"""Fault injection, data side, third round (issue 24): two `grr data fetch` runs into one folder,
SIGTERM to a fetch (the img2dataset-backed one: tests/test_fetch.py), large legal images (stored
within the memory bound, bombs still refused: tests/test_faults_data.py), and list files with a row
that is not UTF-8. Each test failed on the code before its fix (noted per test); the slow ones
start processes or decode 100-Mpixel images."""

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fetch_helpers import left_running
from PIL import Image
from test_faults_data import ENV, REPO
from test_shard import jpeg
from typer.testing import CliRunner

import grr_data.fetch.convert as convert
from grr_cli.main import app
from grr_data.check import check_dataset
from grr_data.fetch import FetchOptions, Interrupted, fetch
from grr_data.format.records import iter_tar_samples
from grr_data.infra.lock import LOCK_NAME
from grr_data.shard.run import shard_dataset
from grr_data.shard.samples import InputError

# ---------------------------------------------------------------- two fetches into one folder


HOLD_FETCH_AFTER_FIRST_SHARD = """
import sys, time
from pathlib import Path
import grr_data.fetch.convert as convert
from grr_cli.main import app
flush, held = convert.PairWriter._flush, []
def flush_then_hold(self):
    flush(self)
    if not held:
        held.append(1)
        print("holding", flush=True)
        while not Path(sys.argv[2]).exists():
            time.sleep(0.05)
convert.PairWriter._flush = flush_then_hold
app(["data", "fetch", "shapes", "--num-pairs", "40", "--shard-size", "10", "--out", sys.argv[1]])
"""


def start_holding_fetch(out: Path, release: Path, new_session: bool = False) -> subprocess.Popen:
    """A `grr data fetch shapes` process waiting, after its first shard, until `release` exists
    (`new_session`: in a process group of its own, which a test may signal whole)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_FETCH_AFTER_FIRST_SHARD, str(out), str(release)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)
    while (line := proc.stdout.readline()) and line.strip() != "holding":
        pass
    assert line, f"the fetch ended before its first shard (exit {proc.wait()}): {proc.stderr.read()[-2000:]}"
    return proc


def fetched_files(out: Path) -> dict[str, object]:
    """A fetch folder's content, as far as it does not depend on when it ran: each tar's members,
    the other files' bytes, and fetch_manifest.json without its times."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        if path.suffix == ".tar":
            files[name] = [(key, sorted(members.items())) for key, members in iter_tar_samples(path)]
        elif path.name == "fetch_manifest.json":
            files[name] = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("created", "elapsed_s")}
        elif path.suffix == ".parquet" or path.name.endswith("_stats.json"):
            files[name] = "present"  # their times differ run to run; the tars and the manifest hold the counts
        else:
            files[name] = path.read_bytes()
    return files


@pytest.mark.slow
def test_a_second_fetch_into_the_same_folder_fails_at_once_naming_the_first(tmp_path, caplog):
    """Old code: the second fetch wrote into the first one's folder and ended in a traceback (a file
    it expected in _work/ vanished under it)."""
    from grr_data.fetch import FetchOptions, fetch

    fetch("shapes", FetchOptions(out=tmp_path / "lone", num_pairs=40, shard_size=10))
    out, release = tmp_path / "out", tmp_path / "release"
    first = start_holding_fetch(out, release)
    try:
        before = fetched_files(out)
        started = time.monotonic()
        result = CliRunner().invoke(app, ["data", "fetch", "shapes", "--num-pairs", "40", "--shard-size", "10",
                                          "--out", str(out)])
        assert time.monotonic() - started < 20  # at once, not after the first fetch ends
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {out} is in use by grr data fetch shapes "
                                                       f"(PID {first.pid} on host {socket.gethostname()}, since "), lines
        assert fetched_files(out) == before  # nothing of the first fetch touched
        release.touch()
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-2000:]
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
    assert fetched_files(out) == fetched_files(tmp_path / "lone") and not (out / LOCK_NAME).exists()
    # A fetch killed outright (kill -9) leaves its lock file; the next fetch on this host takes it over.
    killed_out = tmp_path / "killed"
    killed = start_holding_fetch(killed_out, tmp_path / "never")
    killed.kill()
    killed.wait()
    assert json.loads((killed_out / LOCK_NAME).read_text())["pid"] == killed.pid
    with caplog.at_level(logging.WARNING, logger="grr_data.infra.lock"):
        fetch("shapes", FetchOptions(out=killed_out, num_pairs=40, shard_size=10))
    assert f"taking over the lock left by grr data fetch shapes (PID {killed.pid}" in caplog.text
    assert fetched_files(killed_out) == fetched_files(tmp_path / "lone")


def test_a_fetch_lock_from_another_host_is_reported_and_broken_only_when_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = {"pid": 4242, "host": "gpu-node-17", "started": time.time() - 600, "what": "grr data fetch shapes"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    command = ["data", "fetch", "shapes", "--num-pairs", "3", "--out", str(out)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and "PID 4242 on host gpu-node-17" in result.output, result.output
    assert "--break-lock" in result.output and sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    result = CliRunner().invoke(app, [*command, "--break-lock"])
    assert result.exit_code == 0, result.output
    assert (out / "fetch_manifest.json").is_file() and not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------- a stop signal to a fetch


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to list the fetch's processes")
@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-process", "to-its-group"])
def test_sigterm_stops_a_fetch_as_ctrl_c_does_and_a_rerun_completes_it(tmp_path, to_group):
    """What Slurm, Kubernetes or a preempted VM sends first. Old code: killed outright by it
    (exit -15, no message, its lock left for the next fetch to take over)."""
    out = tmp_path / "out"
    proc = start_holding_fetch(out, tmp_path / "never", new_session=True)
    try:
        (os.killpg if to_group else os.kill)(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM: the fetch into {out} was interrupted. Finished "
                                            "shards are kept; rerun the same command to continue."), err[-2000:]
    assert "Traceback" not in err
    assert not (out / LOCK_NAME).exists() and left_running(proc.pid, []) == []
    assert list(out.glob("train/*_stats.json")), "the shard finished before the signal was not kept"
    assert not (out / "fetch_manifest.json").exists()
    fetch("shapes", FetchOptions(out=out, num_pairs=40, shard_size=10))
    fetch("shapes", FetchOptions(out=tmp_path / "lone", num_pairs=40, shard_size=10))
    assert fetched_files(out) == fetched_files(tmp_path / "lone")


def test_sigterm_to_a_python_fetch_raises_interrupted_and_puts_back_the_handler(tmp_path, monkeypatch):
    """The library, not only the CLI: a Python caller gets a KeyboardInterrupt naming the signal,
    and its own SIGTERM handler back, stopped or not. Old code: the caller's handler ran and the
    fetch went on to the end."""
    flush, flushed = convert.PairWriter._flush, []

    def flush_then_sigterm(self):
        flush(self)
        flushed.append(1)
        if len(flushed) == 2:  # two shards written: a stop mid-fetch
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(convert.PairWriter, "_flush", flush_then_sigterm)
    callers, out = [], tmp_path / "out"

    def callers_handler(signum, frame):
        callers.append(signum)

    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        with pytest.raises(Interrupted) as stop:
            fetch("shapes", FetchOptions(out=out, num_pairs=40, shard_size=10))
        assert callers == [] and signal.getsignal(signal.SIGTERM) is callers_handler
        assert not (out / LOCK_NAME).exists() and len(list(out.glob("*/*_stats.json"))) == 2
        monkeypatch.undo()
        fetch("shapes", FetchOptions(out=out, num_pairs=40, shard_size=10))  # unstopped: the handler is put back too
        assert signal.getsignal(signal.SIGTERM) is callers_handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert callers == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(stop.value, KeyboardInterrupt)
    assert (stop.value.signum, stop.value.signal_name, stop.value.exit_status) == (signal.SIGTERM, "SIGTERM", 143)
    assert str(stop.value) == (f"stopped by SIGTERM: the fetch into {out} was interrupted. Finished shards are kept; "
                               "rerun the same command to continue.")
    fetch("shapes", FetchOptions(out=tmp_path / "lone", num_pairs=40, shard_size=10))
    assert fetched_files(out) == fetched_files(tmp_path / "lone")


# ---------------------------------------------------------------- large legal images


MAKE_LARGE = """
import sys
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
kind, path = sys.argv[1:]
if kind == "jpeg":  # a 100.8-Mpixel camera picture, baseline
    Image.new("RGB", (12000, 8400), (90, 160, 40)).save(path, format="JPEG", quality=90)
elif kind == "png-rgb":
    Image.new("RGB", (12000, 12000), (90, 160, 40)).save(path, format="PNG", compress_level=1)
else:  # a palette PNG: one byte a pixel, every pixel index 3
    image = Image.new("P", (12000, 12000), 3)
    image.putpalette([0, 0, 0] * 3 + [90, 160, 40])
    image.save(path, format="PNG", compress_level=1)
"""

MEASURE_LARGE = """
import io, resource, sys
from PIL import Image
from grr_data.shard.samples import prepare_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    jpg = prepare_image(data)[0]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    stored = Image.open(io.BytesIO(jpg))
    print("stored", f"{stored.width}x{stored.height}", "x".join(map(str, stored.resize((1, 1)).getpixel((0, 0)))))
except ValueError as err:
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    print(*err.args)
print(grown)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind,stored,bound_mb", [
    ("png-rgb", "288x288", 4 * 144 + 48),  # Pillow holds RGB at 4 bytes a pixel: 576 MB decoded, once
    ("png-p", "288x288", 144 + 48),  # 1 byte a pixel decoded; RGB a band at a time (whole: +576 MB)
    ("jpeg", "411x288", 48),  # decoded at 1/8 scale, 1500x1050 (whole: 403 MB)
])
def test_a_large_legal_image_is_stored_within_the_memory_bound(tmp_path, kind, stored, bound_mb):
    """Old code: a 12000x12000 PNG (144 Mpixel) and a 100-Mpixel JPEG were skipped as unusable_image
    ("more than 89,478,485 pixels"). Now they are stored, and a worker's memory grows by at most the
    decoded image (README "Odd images"): measured in a fresh process, as MEASURE_PREPARE does."""
    path = tmp_path / "large"
    subprocess.run([sys.executable, "-c", MAKE_LARGE, kind, str(path)], check=True, timeout=300)
    run = subprocess.run([sys.executable, "-c", MEASURE_LARGE, str(path)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    lines = run.stdout.split("\n")
    assert lines[0].split()[:2] == ["stored", stored], run.stdout + run.stderr[-2000:]
    colour = [int(c) for c in lines[0].split()[2].split("x")]
    assert all(abs(c - e) <= 3 for c, e in zip(colour, (90, 160, 40), strict=True)), colour
    assert int(lines[1]) <= bound_mb, f"{kind}: grew {lines[1]} MB, bound {bound_mb} MB"


def test_the_large_image_path_stores_what_the_whole_image_path_does(monkeypatch):
    """The path for images past WHOLE_PIXELS (draft decoding, conversion and resizing in bands,
    orientation applied last), run on small images by lowering the threshold, against the
    whole-image rule: the same upright size and nearly the same pixels. Measured mean differences:
    0.03 for the palette PNG (band edges), 2.2 for the rotated JPEG (decoded at 1/2 scale: 2.25
    unrotated; resized before turning: 1.0); the picture turned the wrong way differs by 64."""
    import numpy as np

    import grr_data.format.image as image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    rotated = io.BytesIO()
    Image.open(io.BytesIO(jpeg(5, size=(1200, 900)))).save(rotated, format="JPEG", quality=95, exif=exif)
    palette = io.BytesIO()
    Image.open(io.BytesIO(jpeg(6, size=(700, 500)))).quantize(32).save(palette, format="PNG", transparency=4)
    for data, upright, tolerance in ((rotated.getvalue(), (900, 1200), 3.0), (palette.getvalue(), (700, 500), 0.5)):
        whole = image.to_stored_jpeg(image.open_image(data))
        monkeypatch.setattr(image, "WHOLE_PIXELS", 1000)
        monkeypatch.setattr(image, "_BAND_PIXELS", 20_000)  # many bands
        img = image.open_image(data)
        decoded = image.decode(img)
        banded = image.store(decoded)
        monkeypatch.undo()
        assert whole[1:] == banded[1:] and banded[1] == upright, (whole[1:], banded[1:])
        if decoded.image.format == "JPEG":
            assert decoded.image.size == (600, 450) and decoded.box == (0, 0, 600, 450)  # at 1/2 scale
        a, b = (np.asarray(Image.open(io.BytesIO(jpg)), dtype=float) for jpg in (whole[0], banded[0]))
        assert np.abs(a - b).mean() < tolerance, np.abs(a - b).mean()


# ---------------------------------------------------------------- list files with bytes that are not UTF-8


def _pictures(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for n in range(count):
        (folder / f"{n}.jpg").write_bytes(jpeg(n, size=(300, 288)))


def test_one_row_of_a_list_that_is_not_utf8_is_one_skipped_sample(tmp_path, caplog):
    """Old code: the CSV was refused whole ("not UTF-8 text (byte 215); save it as UTF-8")."""
    _pictures(tmp_path / "img", 20)
    rows = [b"path,caption"] + [f"img/{n}.jpg,picture number {n}".encode() for n in range(20)]
    rows[8] = b"img/7.jpg,caf\xe9 au lait"  # line 9 of the file: a Latin-1 e-acute in a UTF-8 list
    (tmp_path / "pairs.csv").write_bytes(b"\n".join(rows) + b"\n")
    lines = [json.dumps({"path": f"img/{n}.jpg", "caption": f"picture number {n}"}).encode() for n in range(20)]
    lines[3] = b'{"path": "img/3.jpg", "caption": "na\xefve"}'  # line 4: the caption
    lines[5] = b'{"path": "img/\xff5.jpg", "caption": "picture number 5"}'  # line 6: the path
    (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.INFO):
        csv_set, _ = shard_dataset(tmp_path / "pairs.csv", tmp_path / "csv", split="100/0", workers=1, progress=False)
        jsonl_set, _ = shard_dataset(tmp_path / "pairs.jsonl", tmp_path / "jsonl", split="100/0", workers=1,
                                     progress=False)
    assert csv_set["skipped"] == {"invalid_utf8_caption": 1} and csv_set["splits"]["train"]["num_samples"] == 19
    assert "pairs.csv:9 (invalid_utf8_caption #1): 'utf-8' codec can't decode byte 0xe9" in caplog.text
    assert jsonl_set["skipped"] == {"invalid_utf8_caption": 1, "bad_line": 1}
    assert jsonl_set["splits"]["train"]["num_samples"] == 18
    assert "pairs.jsonl:4 (invalid_utf8_caption #1)" in caplog.text
    assert "pairs.jsonl:6 (bad_line #1): its path is not UTF-8" in caplog.text
    assert "1 of 20 rows are not UTF-8" in caplog.text and "2 of 20 rows are not UTF-8" in caplog.text
    assert check_dataset(tmp_path / "csv", progress=False).ok and check_dataset(tmp_path / "jsonl", progress=False).ok


def test_a_list_that_is_not_utf8_text_at_all_is_still_refused_whole(tmp_path):
    _pictures(tmp_path / "img", 4)
    text = "path,caption\n" + "".join(f"img/{n}.jpg,caf\u00e9 number {n}\n" for n in range(4))
    (tmp_path / "latin1.csv").write_bytes(text.encode("latin-1"))  # every row holds a Latin-1 e-acute
    (tmp_path / "utf16.csv").write_bytes(text.encode("utf-16"))  # Excel's "Unicode text"
    (tmp_path / "binary.jsonl").write_bytes(jpeg(0))
    cases = {"latin1.csv": r"latin1\.csv: not UTF-8 text \(byte 26\); save it as UTF-8 \(4 of its 4 rows",
             "utf16.csv": r"utf16\.csv: not UTF-8 text \(a NUL byte at byte 3: a binary file, or UTF-16\)",
             "binary.jsonl": r"binary\.jsonl: not UTF-8 text \(a NUL byte at byte \d+"}
    for name, message in cases.items():
        with pytest.raises(InputError, match=message):
            shard_dataset(tmp_path / name, tmp_path / f"out-{name}", workers=1, progress=False)
