"""Photo-like stand-in images for tests and scripts that compare image preprocessing."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: a sky-to-ground gradient, soft-edged shapes of random colours,
    fine sensor-like noise and a JPEG round trip, so resampling meets smooth areas, sharp and
    blurred edges and high frequencies (a flat or random-noise image would hide differences)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    sky, ground = rng.uniform(40, 230, 3), rng.uniform(20, 200, 3)
    base = (1 - t) * sky + t * ground + np.zeros((height, width, 3))
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.uniform(-0.2, 0.9) * width, rng.uniform(-0.2, 0.9) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * width, y0 + rng.uniform(0.1, 0.6) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 400))
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")
