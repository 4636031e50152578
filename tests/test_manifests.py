"""The dataset manifests: present, complete, found through GRR_MANIFESTS, and the sample's crops valid."""

import json
from pathlib import Path

import pytest
from PIL import Image

from grr_data.fetch.catalog import REQUIRED_KEYS, list_manifests, load_manifest, manifests_dir
from grr_data.fetch.sample import skimage_data_dir

DATASETS = ["cc12m", "flickr30k", "mscoco", "roco", "sample", "shapes"]


def test_every_dataset_has_a_complete_manifest():
    assert set(DATASETS) <= set(list_manifests())
    for name in DATASETS:
        manifest = load_manifest(name)
        assert all(key in manifest for key in REQUIRED_KEYS), name
        assert manifest["expected"], name


def test_counts_match_design():
    assert load_manifest("mscoco")["expected"]["pairs"] == {"train": 591753, "val": 25014}
    roco = load_manifest("roco")
    assert roco["expected"]["pairs"] == {"train": 59958, "valid": 9904, "test": 9927}
    # the paper's 69,866 "train" pairs are the mirror's train (59,962) plus valid (9,904)
    assert roco["paper"]["train"] == roco["expected"]["alternatives"]["train"][0] + roco["expected"]["pairs"]["valid"]
    assert load_manifest("flickr30k")["expected"]["images"] == {"train": 29000, "val": 1014, "test": 1000}


def test_env_override_and_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "toy.json").write_text(json.dumps({k: "x" for k in REQUIRED_KEYS} | {"name": "toy"}))
    monkeypatch.setenv("GRR_MANIFESTS", str(tmp_path))
    assert manifests_dir() == tmp_path
    assert load_manifest("toy")["name"] == "toy"
    with pytest.raises(FileNotFoundError, match="no manifest for dataset 'nope'"):
        load_manifest("nope")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_manifest("bad")


def test_sample_crops_are_valid():
    manifest = load_manifest("sample")
    crops = manifest["crops"]
    ids = [c["image_id"] for c in crops]
    assert len(ids) == len(set(ids))
    pairs = sum(len(c["captions"]) for c in crops)
    assert pairs >= 24
    assert sum(len(c["captions"]) >= 2 for c in crops) >= 3
    assert {c["split"] for c in crops} == {"train", "val"}
    for split, n in manifest["expected"]["pairs"].items():
        assert sum(len(c["captions"]) for c in crops if c["split"] == split) == n
    for crop in crops:
        assert crop["photo"] in manifest["photos"], crop["image_id"]
        assert "licence" in manifest["photos"][crop["photo"]]
        with Image.open(skimage_data_dir() / crop["photo"]) as img:
            left, top, right, bottom = crop["box"]
            assert 0 <= left < right <= img.width and 0 <= top < bottom <= img.height, crop["image_id"]
            assert img.mode == "RGB", crop["photo"]


def test_manifests_dir_is_the_repository_folder_by_default(monkeypatch):
    monkeypatch.delenv("GRR_MANIFESTS", raising=False)
    assert manifests_dir() == Path(__file__).resolve().parent.parent / "manifests"
