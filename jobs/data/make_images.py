"""Regenerates the sample images shipped in jobs/data/images/ (deterministic; run from the repo root:
``python -m jobs.data.make_images``). Small synthetic pictures: the tiny demo model cannot see, so what
matters is distinct content (distinct image hashes) at a few sizes."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "images"


def _gradient(w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h))
    im.putdata([(x * 255 // w, y * 255 // h, 128) for y in range(h) for x in range(w)])
    return im


def _checker(w: int, h: int, n: int = 8) -> Image.Image:
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    for i in range(n):
        for j in range(n):
            if (i + j) % 2:
                d.rectangle([i * w // n, j * h // n, (i + 1) * w // n, (j + 1) * h // n], fill=(20, 60, 160))
    return im


def _circles(w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (250, 240, 220))
    d = ImageDraw.Draw(im)
    for k in range(6):
        r = (k + 1) * min(w, h) // 14
        d.ellipse([w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r], outline=(200, 40 * k, 40), width=3)
    return im


def _waves(w: int, h: int) -> Image.Image:
    im = Image.new("L", (w, h))
    im.putdata([int(127 + 127 * math.sin(x / 7.0) * math.cos(y / 11.0)) for y in range(h) for x in range(w)])
    return im.convert("RGB")


IMAGES = {
    "gradient.png": (_gradient, 224, 224),
    "checker.png": (_checker, 256, 192),
    "circles.png": (_circles, 192, 192),
    "waves.png": (_waves, 320, 224),
}


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, (fn, w, h) in IMAGES.items():
        fn(w, h).save(HERE / name, optimize=True)
        print(HERE / name)


if __name__ == "__main__":
    main()
