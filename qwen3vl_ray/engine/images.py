"""Loading and validating the images of a request before any model work.

Every failure raises :class:`ImageError` naming the image (its path or its place in the messages) and the
problem, so one bad image fails its own request only.

Order matters for memory: ``Image.open`` reads only the header, so the size is checked against
``max_pixels`` before a single pixel is decoded (a 12000x12000 PNG of a few hundred KB would otherwise
decode to 432 MB first). PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, error at twice
it) is the hard ceiling above any configured ``max_pixels``. After decoding, the EXIF orientation is
applied exactly as transformers' ``load_image`` does (``ImageOps.exif_transpose``, then RGB), so a
rotated phone photo gives the same tokens as plain transformers.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: resized sides are rounded to this multiple (patch 16 x spatial merge 2), as the image processor does.
_SIDE_MULTIPLE = 32


class ImageError(ValueError):
    """An image cannot be used: unreadable, corrupt, of an unsupported kind, or too large."""


#: EXIF orientations that exif_transpose turns upright (1 is upright already).
_TRANSPOSED_ORIENTATIONS = range(2, 9)


def _describe(source: Any, where: str | None = None) -> str:
    if isinstance(source, (str, os.PathLike)):
        what = f"image file {str(source)!r}"
    elif isinstance(source, (bytes, bytearray)):
        what = f"image bytes ({len(source)} bytes)"
    else:
        what = f"image object {type(source).__name__}"
    return f"{what} at {where}" if where else what


def _open(source: Any, name: str) -> Image.Image:
    """The image with only its header read (nothing decoded yet); a PIL image is returned as given."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            raise ImageError(f"{name}: remote URLs are not fetched; pass a local path, bytes or PIL.Image")
        path = Path(text.removeprefix("file://"))
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{name}: unreadable ({exc.strerror or exc})") from exc
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise ImageError(f"{name}: expected a path, bytes or PIL.Image")
    try:
        with warnings.catch_warnings():
            # the warning band below PIL's hard limit is judged by our own max_pixels check instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused as a decompression bomb before decoding ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image (corrupt or unsupported format: {exc})") from exc


def _decode(img: Image.Image, name: str) -> Image.Image:
    """Decode the pixels and turn the image upright by its EXIF orientation, as transformers' load_image does."""
    try:
        img.load()  # a truncated file fails here, not inside the processor
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in _TRANSPOSED_ORIENTATIONS:
            # exif_transpose returns a new image: a caller's PIL image is never changed. With no
            # orientation to apply it would only copy, so it is skipped (same pixels, no copy).
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image (corrupt or unsupported format: {exc})") from exc
    return img


def load_image(item: dict[str, Any], max_pixels: int, where: str | None = None) -> Image.Image:
    """An upright RGB PIL image for one ``{"type": "image", "image": ...}`` item, validated against ``max_pixels``.

    ``where`` (e.g. ``"messages[0].content[1]"``) is named in errors beside the path or byte count.
    ``max_pixels`` is checked on the header's size, before decoding. ``resized_height``/``resized_width``
    in the item resize the upright image (sides rounded to 32), so the same picture at another
    resolution is another image for the caches.
    """
    source = item["image"]
    name = _describe(source, where)
    img = _open(source, name)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: {w}x{h} = {w * h} pixels exceeds max_pixels {max_pixels}; resize it or raise the limit"
        )
    img = _decode(img, name)  # an EXIF rotation swaps w and h: same pixel count
    w, h = img.size
    if img.mode != "RGB":
        img = img.convert("RGB")
    rh, rw = item.get("resized_height"), item.get("resized_width")
    if rh is not None or rw is not None:
        try:
            rh, rw = int(rh if rh is not None else h), int(rw if rw is not None else w)
        except (TypeError, ValueError) as exc:
            raise ImageError(f"{name}: resized_height/resized_width must be ints, got {rh!r}/{rw!r}") from exc
        rh = max(_SIDE_MULTIPLE, round(rh / _SIDE_MULTIPLE) * _SIDE_MULTIPLE)
        rw = max(_SIDE_MULTIPLE, round(rw / _SIDE_MULTIPLE) * _SIDE_MULTIPLE)
        if rh * rw > max_pixels:
            raise ImageError(f"{name}: resized {rw}x{rh} = {rw * rh} pixels exceeds max_pixels {max_pixels}")
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    return img
