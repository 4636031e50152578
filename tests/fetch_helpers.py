"""Helpers shared by the fetch tests: small JPEGs and reading back an img2dataset-format folder."""

import io
import json
from pathlib import Path

from PIL import Image

from grr_data.records import iter_tar_samples


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
