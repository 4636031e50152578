"""Helpers shared by the fetch tests: small JPEGs and reading back an img2dataset-format folder."""

import importlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from grr_data.format.records import iter_tar_samples


def jpeg(size, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def read_split(folder: Path) -> list[dict]:
    """Every sample of an img2dataset-format folder: json meta plus the decoded image size."""
    samples = []
    for tar in sorted(folder.glob("*.tar")):
        for _, members in iter_tar_samples(tar):
            meta = json.loads(members["json"])
            assert members["txt"].decode() == meta["caption"]
            with Image.open(io.BytesIO(members["jpg"])) as img:
                meta["size"] = img.size
            samples.append(meta)
    return samples


def _shards_in_this_process(processes_count, downloader, reader, subjob_size, max_shard_retry):
    for row in reader:
        downloader(row)


@pytest.fixture
def no_worker_pool(monkeypatch):
    """img2dataset minus its spawned worker pool: reader, downloader, resizer, writers and the logger
    process all run as usual, the shards just run here one by one (the sample test covers the pool)."""
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    main = importlib.import_module("img2dataset.main")
    monkeypatch.setattr(main, "multiprocessing_distributor", _shards_in_this_process)
