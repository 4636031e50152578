"""`grr data fetch` options around img2dataset: a missing distributor, passed-through options, worker
defaults from the machine, and atomic publishing of what the fetchers write. No downloads here."""

import json
import os
import sys

import pytest
import typer
from typer.testing import CliRunner

import grr_data.infra.files
from grr_cli.fetch import fetch_command  # noqa: F401  (registers `fetch` into data_app)
from grr_cli.groups import data_app
from grr_data.fetch import FetchError, FetchOptions, img2ds


def _grr(*args):
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    return CliRunner().invoke(app, ["data", "fetch", *map(str, args)])


@pytest.mark.parametrize("distributor, module, install", [("ray", "ray", "pip install 'ray[default]'"),
                                                          ("pyspark", "pyspark", "pip install pyspark")])
def test_a_missing_distributor_is_one_line_saying_what_to_install(tmp_path, monkeypatch, distributor, module,
                                                                  install):
    monkeypatch.setitem(sys.modules, module, None)  # `import ray` raises ImportError, installed or not
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("http://127.0.0.1:9/a.jpg\ta caption\n")
    out = tmp_path / "out"
    result = _grr("cc12m", "--from", tsv, "--out", out, "--distributor", distributor)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"--distributor {distributor} needs {module}" in lines[0] and install in lines[0]
    assert "rerun" not in lines[0].lower()
    assert not out.exists()  # refused before any work


def test_img2dataset_options_are_typed_by_its_signature():
    parsed = img2ds.parse_passthrough(["min_image_size=64", "max_aspect_ratio=3.5", "skip_reencode=true",
                                "disallowed_header_directives=noai,noimageai", "user_agent_token=grr",
                                "max-shard-retry=3"])
    assert parsed == {"min_image_size": 64, "max_aspect_ratio": 3.5, "skip_reencode": True,
                      "disallowed_header_directives": ["noai", "noimageai"], "user_agent_token": "grr",
                      "max_shard_retry": 3}
    opts = img2ds.img2dataset_options(FetchOptions(out="x", workers=1, threads=2,
                                            img2dataset_options=["min_image_size=64"]), None)
    assert opts["min_image_size"] == 64 and opts["image_size"] == 288


@pytest.mark.parametrize("item, message", [
    ("min_imag_size=64", "min_imag_size: img2dataset's download() has no such option; it takes"),
    ("min_image_size=big", "min_image_size=big: invalid literal"),
    ("skip_reencode=maybe", "expected true or false"),
    ("image_size=512", "grr sets it itself"),
    ("thread_count=8", "use --threads"),
    ("min_image_size", "write it as key=value"),
])
def test_bad_img2dataset_options_are_one_line_errors(item, message):
    with pytest.raises(FetchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        img2ds.parse_passthrough([item])


def test_an_unknown_img2dataset_option_through_the_cli(tmp_path):
    result = _grr("sample", "--out", tmp_path / "o", "--img2dataset-option", "no_such_thing=1")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "no_such_thing: img2dataset's download() has no such option" \
        in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cpus, workers, threads", [(1, 1, 32), (2, 2, 32), (6, 6, 21), (16, 16, 8), (64, 64, 8)])
def test_workers_and_threads_default_from_the_usable_cores(monkeypatch, cpus, workers, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert img2ds.machine_defaults() == (workers, threads)
    opts = img2ds.img2dataset_options(FetchOptions(out="x"), None)
    assert (opts["processes_count"], opts["thread_count"]) == (workers, threads)
    line = img2ds.resolve_workers(FetchOptions(out="x"))[2]
    assert f"{workers} processes x {threads} threads (defaults for {cpus} usable CPU cores" in line
    given = img2ds.img2dataset_options(FetchOptions(out="x", workers=3, threads=5), None)
    assert (given["processes_count"], given["thread_count"]) == (3, 5)
    assert "3 processes x 5 threads (given" in img2ds.resolve_workers(FetchOptions(out="x", workers=3, threads=5))[2]
    # never more processes than shards (each one takes seconds to start and works on one shard)
    few = img2ds.img2dataset_options(FetchOptions(out="x"), None, num_shards=1)
    assert (few["processes_count"], few["thread_count"]) == (1, 32)
    assert "1 processes x 32 threads (defaults for" in img2ds.resolve_workers(FetchOptions(out="x"), 1)[2]
    assert img2ds.machine_defaults(num_shards=1000)[0] == workers


def test_fetch_files_are_published_through_grr_data_files(tmp_path, monkeypatch):
    """Shards, URL lists and downloads go through grr_data.infra.files (fsync, rename, fsync the folder)."""
    from fetch_helpers import jpeg

    from grr_data.fetch.common import download_file
    from grr_data.fetch.convert import PairWriter, SourceImage

    synced = []
    real = grr_data.infra.files.fsync_path
    monkeypatch.setattr(grr_data.infra.files, "fsync_path", lambda p: (synced.append(os.fspath(p)), real(p)))
    def published(path):  # publish() fsyncs the finished temporary beside `path`, then the folder
        return str(path.parent) in synced and any(os.path.dirname(p) == str(path.parent) and
                                                  os.path.basename(p).startswith(f".{path.name}.tmp-") for p in synced)

    writer = PairWriter(tmp_path / "w", shard_size=10)
    data = jpeg((300, 300))
    writer.add(SourceImage(image_id="1", captions=["a", "b"], source="x", read=lambda: data))
    writer.close()
    for name in ("00000.tar", "00000.parquet", "00000_stats.json"):
        assert published(tmp_path / "w" / name), name
    assert json.loads((tmp_path / "w" / "00000_stats.json").read_text())["successes"] == 2
    img2ds.write_url_list(tmp_path / "u" / "urls.parquet", {"url": ["a"], "caption": ["b"]}, "id")
    assert published(tmp_path / "u" / "urls.parquet") and published(tmp_path / "u" / "urls.parquet.source")
    (tmp_path / "src.bin").write_bytes(b"123")
    download_file((tmp_path / "src.bin").as_uri(), tmp_path / "d" / "src.bin")
    assert str(tmp_path / "d" / "src.bin.part") in synced and str(tmp_path / "d") in synced
    assert (tmp_path / "d" / "src.bin").read_bytes() == b"123"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name) == []
