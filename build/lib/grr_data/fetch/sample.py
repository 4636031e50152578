"""The offline `sample` set: hand-captioned crops of scikit-image's photographs, fetched with img2dataset.

The crops, captions, splits and licences are in `manifests/sample.json`. The crops are written as
PNG, served on 127.0.0.1 and fetched through the same img2dataset path as a real dataset, so a first
run exercises the whole pipeline without a network.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from grr_data.fetch.common import WORK_DIR, FetchError, FetchOptions, FetchReport
from grr_data.fetch.loopback import serve_directory
from grr_data.fetch.staged import fetch_staged


def skimage_data_dir() -> Path:
    try:
        import skimage
    except ImportError as err:
        raise FetchError("the sample set needs scikit-image (pip install scikit-image)") from err
    return Path(skimage.__file__).resolve().parent / "data"


def write_crops(manifest: dict, folder: Path) -> None:
    """Cut every crop of the manifest out of its photograph and save it losslessly."""
    data_dir = skimage_data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for crop in manifest["crops"]:
        target = folder / f"{crop['image_id']}.png"
        if target.exists():
            continue
        photo = data_dir / crop["photo"]
        if not photo.is_file():
            raise FetchError(f"{photo}: photograph missing from scikit-image; reinstall scikit-image")
        with Image.open(photo) as img:
            tmp = target.with_suffix(".tmp.png")
            img.convert("RGB").crop(tuple(crop["box"])).save(tmp)
            tmp.replace(target)


def fetch(options: FetchOptions) -> dict:
    out = Path(options.out)
    report = FetchReport("sample", options)
    manifest = report.manifest
    images = out / WORK_DIR / "sample_images"
    write_crops(manifest, images)
    report.sources.append({"package": "scikit-image", "folder": str(skimage_data_dir()),
                           "photos": sorted({c["photo"] for c in manifest["crops"]})})
    with serve_directory(images) as base_url:
        rows = [{"url": f"{base_url}/{crop['image_id']}.png", "image_id": crop["image_id"],
                 "source_split": crop["split"], "captions": crop["captions"]} for crop in manifest["crops"]]
        # The port changes per run; the URL list is rebuilt then, while finished shards are kept.
        fetch_staged(rows, options, report, source_id=base_url)
    return report.finish()
