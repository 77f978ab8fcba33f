"""Loading and validating the images of a request before any model work.

Every failure raises :class:`ImageError` naming the image (its path or its place in the messages) and the
problem, so one bad image fails its own request only.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: resized sides are rounded to this multiple (patch 16 x spatial merge 2), as the image processor does.
_SIDE_MULTIPLE = 32


class ImageError(ValueError):
    """An image cannot be used: unreadable, corrupt, of an unsupported kind, or too large."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file {str(source)!r}"
    if isinstance(source, (bytes, bytearray)):
        return f"image bytes ({len(source)} bytes)"
    return f"image object {type(source).__name__}"


def _open(source: Any) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            raise ImageError(f"{_describe(source)}: remote URLs are not fetched; pass a local path, bytes or PIL.Image")
        path = Path(text.removeprefix("file://"))
        if not path.is_file():
            raise ImageError(f"{_describe(source)}: no such file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{_describe(source)}: unreadable ({exc.strerror or exc})") from exc
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise ImageError(f"{_describe(source)}: expected a path, bytes or PIL.Image")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated file fails here, not inside the processor
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{_describe(source)}: not a readable image (corrupt or unsupported format: {exc})") from exc
    return img


def load_image(item: dict[str, Any], max_pixels: int) -> Image.Image:
    """An RGB PIL image for one ``{"type": "image", "image": ...}`` item, validated against ``max_pixels``.

    ``resized_height``/``resized_width`` in the item resize the image first (sides rounded to 32), so the
    same picture at another resolution is another image for the caches.
    """
    source = item["image"]
    img = _open(source)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{_describe(source)}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"{_describe(source)}: {w}x{h} = {w * h} pixels exceeds max_pixels {max_pixels}; resize it or raise the limit"
        )
    if img.mode != "RGB":
        img = img.convert("RGB")
    rh, rw = item.get("resized_height"), item.get("resized_width")
    if rh is not None or rw is not None:
        try:
            rh, rw = int(rh if rh is not None else h), int(rw if rw is not None else w)
        except (TypeError, ValueError) as exc:
            raise ImageError(f"resized_height/resized_width must be ints, got {rh!r}/{rw!r}") from exc
        rh = max(_SIDE_MULTIPLE, round(rh / _SIDE_MULTIPLE) * _SIDE_MULTIPLE)
        rw = max(_SIDE_MULTIPLE, round(rw / _SIDE_MULTIPLE) * _SIDE_MULTIPLE)
        if rh * rw > max_pixels:
            raise ImageError(f"resized {rw}x{rh} = {rw * rh} pixels exceeds max_pixels {max_pixels}")
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    return img
