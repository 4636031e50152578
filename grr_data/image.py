"""The stored image form (DESIGN.md): a JPEG whose shorter side is 288, upright, at quality 95.

One resize rule for every path that writes images (fetch converters and `grr data shard`), the
same as img2dataset's `keep_ratio`: EXIF orientation applied, BOX filter down, LANCZOS up.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

IMAGE_SIZE = 288  # shorter side
JPEG_QUALITY = 95
_ORIENTATION = 0x0112  # EXIF tag; 1 is upright


def is_stored_form(img: Image.Image) -> bool:
    """Whether an opened image's own bytes can be stored as they are."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and min(img.size) == IMAGE_SIZE
            and img.getexif().get(_ORIENTATION, 1) == 1)


def to_stored_jpeg(img: Image.Image) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """(JPEG bytes of the stored form, upright size before resizing, stored size) of an opened image."""
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")
    width, height = img.size
    scale = IMAGE_SIZE / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
    buf = io.BytesIO()
    img.resize(size, resample).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), (width, height), size
