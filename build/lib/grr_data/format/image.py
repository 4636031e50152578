"""The stored image form (docs/DESIGN.md, "Contracts"): a JPEG whose shorter side is 288, upright, at quality 95.

One resize rule for every path that writes images (fetch converters and `grr data shard`), the
same as img2dataset's `keep_ratio`: EXIF orientation applied, BOX filter down, LANCZOS up.

Large images are legal, up to Pillow's own decompression-bomb error threshold, and one worker
decodes each within a stated memory bound (README "Odd images"):
- up to `WHOLE_PIXELS` (Pillow's warning threshold, ~89.5 Mpixel) an image is decoded, converted
  and resized whole, as it always was (so the stored bytes of such images did not change);
- above it, a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, Pillow's
  draft mode), the smallest that still covers the stored size: a 100-Mpixel photograph is decoded
  as ~1.6 Mpixel; any other image is decoded whole once (Pillow holds 1 byte a pixel for L and P,
  4 for RGB and RGBA) and then converted to RGB and resized a band of rows at a time, so the
  decoded image is never copied whole;
- above `MAX_SOURCE_PIXELS` (2 x Pillow's `MAX_IMAGE_PIXELS`, Pillow's DecompressionBombError)
  it is refused from its header, before any pixel is decoded.
Images whose sides differ by more than `MAX_ASPECT_RATIO` are refused from the header too: stored
with a shorter side of 288 they would be a strip (1x400 would be 288x115200, past JPEG's 65,535
limit; 1x3000 needs ~750 MB to resize), and squashed to the loader's square they show nothing.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import NamedTuple

from PIL import Image, ImageOps

IMAGE_SIZE = 288  # shorter side
JPEG_QUALITY = 95
_ORIENTATION = 0x0112  # EXIF tag; 1 is upright
# EXIF orientation -> the transposition that makes the picture upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
WHOLE_PIXELS = 89_478_485  # Pillow's DecompressionBombWarning threshold (Image.MAX_IMAGE_PIXELS)
MAX_SOURCE_PIXELS = 2 * WHOLE_PIXELS  # Pillow's DecompressionBombError threshold: 178,956,970
MAX_ASPECT_RATIO = 20
_BAND_PIXELS = 1 << 22  # source pixels converted at a time above WHOLE_PIXELS (16 MB at 4 bytes a pixel)


class UnusableImage(ValueError):
    """A valid image that cannot be stored (too many pixels, too elongated); one bad sample."""


class Decoded(NamedTuple):
    """An image decoded for storing (`decode`)."""

    image: Image.Image  # its pixels, at 1/2, 1/4 or 1/8 scale for a large JPEG
    size: tuple[int, int]  # (width, height) in the file, before any reduction or orientation
    box: tuple[float, float, float, float]  # the region of `image` that holds the whole picture


def check_usable(size: tuple[int, int]) -> None:
    """Raise UnusableImage when an image of this (width, height) cannot be stored."""
    width, height = size
    if width < 1 or height < 1:
        raise UnusableImage(f"{width}x{height}: an image without pixels")
    if width * height > MAX_SOURCE_PIXELS:
        raise UnusableImage(f"{width}x{height}: more than {MAX_SOURCE_PIXELS:,} pixels (Pillow's decompression-bomb "
                            "limit)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnusableImage(f"{width}x{height}: one side more than {MAX_ASPECT_RATIO} times the other (stored "
                            f"with its shorter side at {IMAGE_SIZE} it would be "
                            f"{IMAGE_SIZE * max(width, height) // min(width, height):,} pixels long)")


def open_image(data: bytes) -> Image.Image:
    """An image's bytes opened, nothing decoded yet. Pillow's warning past WHOLE_PIXELS is muted
    (such images are legal here); its error past MAX_SOURCE_PIXELS is raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def is_stored_form(img: Image.Image) -> bool:
    """Whether an opened image's own bytes can be stored as they are."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and min(img.size) == IMAGE_SIZE
            and img.getexif().get(_ORIENTATION, 1) == 1)


def _stored_size(size: tuple[int, int]) -> tuple[int, int]:
    """The stored (width, height) of a picture of `size`, in the same orientation."""
    scale = IMAGE_SIZE / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def decode(img: Image.Image) -> Decoded:
    """Decode an opened image (after check_usable): whole, or for a JPEG of more than WHOLE_PIXELS
    at the smallest of 1/2, 1/4, 1/8 that still covers its stored size. Raises what Pillow raises
    for bad data."""
    size = img.size
    box = (0.0, 0.0, float(size[0]), float(size[1]))
    if img.format == "JPEG" and size[0] * size[1] > WHOLE_PIXELS:
        drafted = img.draft(None, _stored_size(size))  # None when already decoded
        if drafted is not None:
            box = drafted[1]
    img.load()
    return Decoded(img, size, box)


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    return img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")


def _resize_in_bands(img: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """`img`'s region `box` reduced to `size` as RGB (BOX filter), converting at most about
    _BAND_PIXELS source pixels at a time, so a large image is never copied whole."""
    left, top, right, bottom = box
    width, height = size
    per_row = (bottom - top) / height  # source rows an output row covers
    rows = max(1, int(_BAND_PIXELS / (img.width * per_row)))  # output rows a band makes
    out = Image.new("RGB", size)
    for first in range(0, height, rows):
        last = min(height, first + rows)
        src_top = top + first * per_row
        src_bottom = bottom if last == height else top + last * per_row
        y0, y1 = int(src_top), min(img.height, math.ceil(src_bottom))
        band = _rgb(img.crop((0, y0, img.width, y1)))
        out.paste(band.resize((width, last - first), Image.Resampling.BOX,
                              box=(left, src_top - y0, right, src_bottom - y0)), (0, first))
    return out


def store(decoded: Decoded) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """(JPEG bytes of the stored form, upright size before resizing, stored size) of a decoded image."""
    img, (width, height) = decoded.image, decoded.size
    if width * height <= WHOLE_PIXELS:  # the rule as it always was
        img = _rgb(ImageOps.exif_transpose(img))
        width, height = img.size
        size = _stored_size(img.size)
        resample = Image.Resampling.BOX if min(width, height) > IMAGE_SIZE else Image.Resampling.LANCZOS
        stored = img.resize(size, resample)
    else:  # reduced in the file's orientation, then turned upright: the whole image is never copied
        orientation = img.getexif().get(_ORIENTATION, 1)
        stored = _resize_in_bands(img, _stored_size((width, height)), decoded.box)
        if orientation in _UPRIGHT:
            stored = stored.transpose(_UPRIGHT[orientation])
            if orientation >= 5:  # turned a quarter
                width, height = height, width
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), (width, height), stored.size


def to_stored_jpeg(img: Image.Image) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """(JPEG bytes of the stored form, upright size before resizing, stored size) of an opened image;
    raises UnusableImage (before decoding) for one that cannot be stored."""
    check_usable(img.size)
    return store(decode(img))
