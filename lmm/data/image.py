"""Decoding and transforming images into the tensors a vision tower takes."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from lmm.model.image_spec import ImageSpec

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes (so truncated files fail here, not later)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; 16/32-bit greyscale is rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


class ImageTransform:
    """RGB conversion, resize to the tower's square input, per-channel normalisation."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec
        self._mean = torch.tensor(spec.mean).view(3, 1, 1)
        self._std = torch.tensor(spec.std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        if img.size != (self.spec.size, self.spec.size):
            img = img.resize((self.spec.size, self.spec.size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std

    def blank(self) -> torch.Tensor:
        """An image with no content: the mean colour, i.e. all zeros after normalisation."""
        return torch.zeros(3, self.spec.size, self.spec.size)
