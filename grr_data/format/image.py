"""The stored image form (docs/DESIGN.md, "Contracts"): a JPEG whose shorter side is 288, upright, at quality 95.

One resize rule for every path that writes images (fetch converters and `grr data shard`), the
same as img2dataset's `keep_ratio`: EXIF orientation applied, BOX filter down, LANCZOS up.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

IMAGE_SIZE = 288  # shorter side
JPEG_QUALITY = 95
_ORIENTATION = 0x0112  # EXIF tag; 1 is upright
# Limits checked from the header, before any pixel is decoded, so one image cannot take a
# worker's memory: Pillow's own decompression-bomb threshold (~268 MB of RGB decoded), and an
# aspect ratio past which the stored form (shorter side 288) is a strip (1x400 would be stored
# 288x115200, past JPEG's 65,535 limit; 1x3000 needs ~750 MB to resize). Such a picture squashed
# to the loader's 288x288 square shows nothing anyway.
MAX_SOURCE_PIXELS = 89_478_485
MAX_ASPECT_RATIO = 20


class UnusableImage(ValueError):
    """A valid image that cannot be stored (too many pixels, too elongated); one bad sample."""


def check_usable(size: tuple[int, int]) -> None:
    """Raise UnusableImage when an image of this (width, height) cannot be stored."""
    width, height = size
    if width < 1 or height < 1:
        raise UnusableImage(f"{width}x{height}: an image without pixels")
    if width * height > MAX_SOURCE_PIXELS:
        raise UnusableImage(f"{width}x{height}: more than {MAX_SOURCE_PIXELS:,} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnusableImage(f"{width}x{height}: one side more than {MAX_ASPECT_RATIO} times the other (stored "
                            f"with its shorter side at {IMAGE_SIZE} it would be "
                            f"{IMAGE_SIZE * max(width, height) // min(width, height):,} pixels long)")


def is_stored_form(img: Image.Image) -> bool:
    """Whether an opened image's own bytes can be stored as they are."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and min(img.size) == IMAGE_SIZE
            and img.getexif().get(_ORIENTATION, 1) == 1)


def to_stored_jpeg(img: Image.Image) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """(JPEG bytes of the stored form, upright size before resizing, stored size) of an opened image;
    raises UnusableImage (before decoding) for one that cannot be stored."""
    check_usable(img.size)
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
