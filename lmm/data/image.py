"""Decoding and transforming images into the tensors a vision tower takes.

Every PIL mode becomes 8-bit RGB (``to_rgb``), then the tower's ``ImageSpec`` decides how a
non-square image becomes its square input (``fit_square``: the tower's own processor, pad,
crop, resize or letterbox) and how pixels are normalised (``ImageTransform``). ``square`` and
``pad`` give exactly the pixels of transformers' PIL-backend CLIP / SigLIP processors (alone,
or after LLaVA's ``expand2square``), as ``tests/test_image_parity.py`` checks.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lmm.errors import ConfigError, SampleError
from lmm.visual.image_spec import ImageSpec

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")

WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Modes whose alpha channel PIL's convert("RGBA") keeps (premultiplied "RGBa"/"La" included).
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


# What image members are opened as: PIL never hands shard bytes to another decoder (EPS, for
# one, would run Ghostscript). JPEG covers multi-picture JPEGs (MPO) too.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Pixel modes ``to_rgb`` converts (tested one by one); any other mode is skipped as image_mode.
RGB_CONVERTIBLE_MODES = (
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "I;16",
    "I;16L",
    "I;16B",
    "I;16N",
    "F",
)
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# ``fit_square``'s modes: ``ImageSpec.preprocess`` with ``square`` resolved to the tower's own.
_CONCRETE_MODES = ("pad", "crop", "resize", "letterbox")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode image bytes (so truncated files fail here, not later).

    Raises ``SampleError``: ``image_decode`` for empty, corrupt or truncated bytes or a format
    outside ``IMAGE_FORMATS``; ``image_too_large`` above ``max_pixels`` pixels (read from the
    header, before any pixel is decoded; PIL itself refuses above 2 x ``Image.MAX_IMAGE_PIXELS``);
    ``image_mode`` for a mode outside ``RGB_CONVERTIBLE_MODES``.
    """
    if not data:
        raise SampleError("image_decode", "empty image bytes")
    try:
        with warnings.catch_warnings():
            # The cap below decides; PIL's warning for sizes between its two limits is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        raise SampleError("image_too_large", str(err)) from None
    except UnidentifiedImageError:
        raise SampleError(
            "image_decode", f"not a readable {'/'.join(IMAGE_FORMATS)} image"
        ) from None
    except Exception as err:  # PIL raises many types for bad bytes
        raise SampleError("image_decode", f"unreadable image header ({err})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise SampleError(
            "image_too_large",
            f"{width}x{height} = {width * height:,} pixels, more than "
            f"data.max_image_pixels={max_pixels:,}",
        )
    if img.mode not in RGB_CONVERTIBLE_MODES:
        raise SampleError("image_mode", f"pixel mode {img.mode!r} has no conversion to RGB")
    try:
        img.load()
    except Exception as err:
        raise SampleError("image_decode", f"corrupt or truncated image data ({err})") from None
    return img


def _round_u8(arr: np.ndarray) -> np.ndarray:
    """Round half up to uint8 (values already in [0, 255])."""
    return np.floor(arr + 0.5).clip(0, 255).astype(np.uint8)


def _greyscale_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale -> 8-bit ``L``, scaled, never clipped.

    - ``I;16*`` (16-bit, the bit depth is known): ``v * 255 / 65535``.
    - ``I`` (32-bit int, bit depth unknown) and ``F`` (float): the data is read in the smallest
      usual range that holds it: ``[0, 1]`` (``F`` only, scaled by 255), ``[0, 255]`` (kept),
      ``[0, 65535]`` (16-bit data, as some decoders deliver it: scaled like ``I;16``); values
      below 0 or above 65535 are min-max stretched to ``[0, 255]``.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode in _SIXTEEN_BIT:
        scale_from = 65535.0
    else:
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 65535:
            span = hi - lo
            arr = (arr - lo) * 255.0 / span if span > 0 else np.zeros_like(arr)
            return Image.fromarray(_round_u8(arr))
        if img.mode == "F" and hi <= 1.0:
            scale_from = 1.0
        elif hi <= 255:
            scale_from = 255.0
        else:
            scale_from = 65535.0
    return Image.fromarray(_round_u8(arr * 255.0 / scale_from))


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    - ``RGB``: unchanged. ``L``, ``1``, ``P`` (palette), ``YCbCr``: PIL's conversion.
    - ``I;16`` / ``I`` / ``F``: see ``_greyscale_to_l`` (16-bit scaled to 8 bits, not clipped).
    - ``CMYK``: ``R = (255 - C) * (255 - K) / 255`` (likewise G, B); no ICC profile is applied.
    - Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, and ``P``/``L``/``RGB``
      with a transparent colour): alpha-composited over ``background``:
      ``out = c * a / 255 + background * (1 - a / 255)``, rounded half up. ``ImageTransform``
      passes the tower's mean colour, so a transparent pixel looks like padding ("no content");
      the default here, white, is what an image viewer shows.
    """
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        img = _greyscale_to_l(img)
    if img.mode in _WITH_ALPHA or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:4] / 255.0
        out = rgba[..., :3] * alpha + np.asarray(background, dtype=np.float64) * (1.0 - alpha)
        return Image.fromarray(_round_u8(out))
    return img if img.mode == "RGB" else img.convert("RGB")


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """An RGB image centred on a ``fill`` square of side ``max(w, h)`` (the extra row/column at
    the bottom/right): LLaVA's ``expand2square``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_and_centre_crop(img: Image.Image, shortest: int, size: int) -> Image.Image:
    """The shortest edge resized to ``shortest`` (the other to ``int(shortest * long / short)``,
    as transformers computes it), then the centre ``size x size`` (offsets rounded down)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(shortest * long / short)
    new_w, new_h = (shortest, new_long) if w <= h else (new_long, shortest)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (left, top, new_w, new_h) == (0, 0, size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def fit_square(
    img: Image.Image,
    size: int,
    preprocess: str,
    fill: tuple[int, int, int],
    crop_from: Optional[int] = None,
) -> Image.Image:
    """An RGB image -> ``size x size`` RGB by ``preprocess`` (``resize``, ``crop``, ``pad`` or
    ``letterbox``; see ``ImageSpec``, whose ``mode`` resolves ``square``).

    ``crop``: the shortest edge is resized to ``crop_from`` (None: ``size``). ``pad`` resizes
    its square to ``size``: what CLIP's and SigLIP's processors do to a square image at their
    own input size. Resampling is bicubic (PIL's, as transformers' PIL-backend processors).
    """
    if preprocess not in _CONCRETE_MODES:
        raise ConfigError(
            f"model.vision.image_preprocess: unknown mode {preprocess!r}; allowed: {', '.join(_CONCRETE_MODES)}"
        )
    w, h = img.size
    if preprocess == "crop":
        return resize_and_centre_crop(img, crop_from or size, size)
    if preprocess == "pad":
        img = expand_to_square(img, fill)
        w, h = img.size
    if preprocess == "letterbox" and (w, h) != (size, size):
        scale = size / max(w, h)
        # The longer side becomes exactly `size`; the shorter keeps the ratio (at least 1 px).
        nw, nh = (size, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), size)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        if (nw, nh) != (size, size):
            canvas = Image.new("RGB", (size, size), fill)
            canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
            img = canvas
        return img
    if (w, h) != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


class ImageTransform:
    """RGB conversion, fit into the tower's square input (``spec.mode``), normalisation.

    A spec with several views (a fused tower's ``StackedImageSpec``) gives each view's tensor,
    prepared from the original image as that view's own transform would, stacked along channels.
    """

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec
        self._mean = torch.tensor(spec.mean).view(3, 1, 1)
        self._std = torch.tensor(spec.std).view(3, 1, 1)
        views = spec.views
        self._others = [ImageTransform(v) for v in views[1:]] if len(views) > 1 else []
        self._variants: dict[str, ImageTransform] = {}

    def variant(self, preprocess: str) -> "ImageTransform":
        """The transform of the same tower with another ``preprocess`` (e.g. OneVision's padded
        multi-image views next to squashed base views); ``self`` when it is the same."""
        if preprocess == self.spec.preprocess:
            return self
        if preprocess not in self._variants:
            self._variants[preprocess] = ImageTransform(self.spec.with_preprocess(preprocess))
        return self._variants[preprocess]

    def prepare(self, img: Image.Image) -> Image.Image:
        """Any PIL image -> the ``size x size`` RGB image the tower sees (before normalisation)."""
        spec = self.spec
        return fit_square(
            to_rgb(img, background=spec.fill),
            spec.size,
            spec.mode,
            spec.fill,
            crop_from=spec.crop_from if spec.mode == "crop" else None,
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Any PIL image -> ``[spec.channels, size, size]`` normalised float tensor."""
        own = self._normalise(self.prepare(img))
        return torch.cat([own, *(t(img) for t in self._others)]) if self._others else own

    def normalise(self, rgb: Image.Image) -> torch.Tensor:
        """An RGB image already at the tower's size (e.g. an AnyRes crop) -> normalised tensor
        (every view's normalisation of the same pixels)."""
        own = self._normalise(rgb)
        return torch.cat([own, *(t.normalise(rgb) for t in self._others)]) if self._others else own

    def _normalise(self, rgb: Image.Image) -> torch.Tensor:
        x = (
            torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
            .permute(2, 0, 1)
            .float()
            .div_(255.0)
        )
        return (x - self._mean) / self._std

    def blank(self) -> torch.Tensor:
        """An image with no content: the mean colour, i.e. all zeros after normalisation."""
        return torch.zeros(self.spec.channels, self.spec.size, self.spec.size)
