"""What a vision tower expects of an image: size, normalisation and how a non-square image
is fitted into its square input."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Optional

from lmm.errors import ConfigError

# How an image of any aspect ratio becomes the tower's ``size x size`` input:
#   square:    exactly what the tower's own image processor does (``native`` below): SigLIP
#              squashes to size x size, CLIP resizes the shortest edge and centre-crops
#              (LLaVA / TinyLLaVA / LLaVA-NeXT ``image_aspect_ratio: square``, their default);
#   pad:       pad the image to a square with the mean colour, centred, then resize to size
#              (LLaVA-1.5's ``image_aspect_ratio: pad``, "expand2square": what CLIP's and
#              SigLIP's own processors then do to the square);
#   crop:      resize the shortest edge to ``crop_from`` (default ``size``), keep the centre
#              ``size x size`` (CLIP's processor, for any tower);
#   resize:    squash to size x size (aspect ratio not kept);
#   letterbox: scale so the longer side is ``size`` (aspect kept), then pad the shorter side
#              to ``size`` with the mean colour, centred.
# When padding or cropping is odd the extra row/column goes to the bottom/right.
Preprocess = Literal["square", "pad", "crop", "resize", "letterbox"]
PREPROCESS_MODES: tuple[str, ...] = ("square", "pad", "crop", "resize", "letterbox")
# What a tower's own processor does (``ImageSpec.native``); ``square`` means that mode.
NATIVE_MODES: tuple[str, ...] = ("resize", "crop")
# How the mean colour becomes 8 bits (``ImageSpec.fill_rounding``).
FillRounding = Literal["floor", "nearest"]
FILL_ROUNDINGS: tuple[str, ...] = ("floor", "nearest")

# Defaults by model type, for towers saved without a preprocessor_config.json.
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# DINOv2 was trained on ImageNet statistics (every facebook/dinov2-* processor config carries
# them; BitImageProcessor's class default would be CLIP's).
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_DEFAULT_NORM = {
    "clip_vision_model": _OPENAI_CLIP,
    "siglip_vision_model": _HALF,
    "dinov2": _IMAGENET,
    "dinov2_with_registers": _IMAGENET,
}
# CLIPImageProcessor resizes the shortest edge and centre-crops; SiglipImageProcessor squashes.
_DEFAULT_NATIVE = {"clip_vision_model": "crop", "siglip_vision_model": "resize"}


@dataclass(frozen=True)
class ImageSpec:
    """Input size, per-channel normalisation and aspect handling of a vision tower.

    The tower builds it; the data side receives it through ``Processor.image_spec`` and
    ``ImageTransform`` applies it, so train and eval images are prepared the same way.

    Args:
        size: Side of the tower's square input in pixels.
        mean: Per-channel mean on the 0-1 scale (subtracted before dividing by ``std``).
        std: Per-channel standard deviation on the 0-1 scale.
        preprocess: How a non-square image becomes ``size x size``: ``square`` (the tower's
            own processor, ``native``), ``pad`` (pad to a square with the mean colour, then
            resize; LLaVA-1.5), ``crop`` (shortest edge to ``crop_from``, centre
            crop), ``resize`` (squash) or ``letterbox`` (scale to fit keeping the aspect
            ratio, then pad with the mean colour).
        native: What the tower's own image processor does: ``resize`` (squash: SigLIP) or
            ``crop`` (shortest edge, then centre crop: CLIP). None: a processor lmm does not
            reproduce; ``square`` is then refused.
        crop_from: ``crop`` (and a ``crop``-native tower's ``square``): the side the shortest
            edge is resized to before the centre crop (None: ``size``; DINOv2's processor: 256
            for 224).
        fill_rounding: How the mean colour (the padding, and the background of transparent
            pixels) becomes 8-bit RGB: ``floor`` = ``int(mean * 255)`` as LLaVA, TinyLLaVA and
            LLaVA-NeXT compute it (CLIP (122, 116, 104), SigLIP (127, 127, 127)); ``nearest``
            rounds (CLIP (123, 117, 104), SigLIP 128), which normalises closer to zero.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess: Preprocess = "pad"
    native: Optional[str] = "resize"
    crop_from: Optional[int] = None
    fill_rounding: FillRounding = "floor"

    def __post_init__(self) -> None:
        _check_choice("model.vision.image_preprocess", self.preprocess, PREPROCESS_MODES)
        _check_choice("model.vision.fill_rounding", self.fill_rounding, FILL_ROUNDINGS)
        if self.native is not None and self.native not in NATIVE_MODES:
            raise ConfigError(
                f"image spec: unknown native mode {self.native!r}; allowed: {', '.join(NATIVE_MODES)} or None"
            )
        if int(self.size) != self.size or self.size < 1:
            raise ConfigError(f"image size must be a positive integer, got {self.size!r}")
        if self.crop_from is not None and self.crop_from < self.size:
            raise ConfigError(
                f"image spec: crop_from={self.crop_from} is smaller than the input size {self.size}; "
                "the centre crop would need padding"
            )
        if self.preprocess == "square" and self.native is None:
            raise ConfigError(
                "model.vision.image_preprocess=square reproduces the tower's own image processor, but this "
                "tower's processor is not one lmm reproduces (a squash or a shortest-edge resize + centre crop "
                "to the input size); choose resize, crop, pad or letterbox"
            )
        # JSON configs give lists; a frozen, hashable spec wants tuples of floats.
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ConfigError(f"image {name} needs 3 values (R, G, B), got {value}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"image std must be positive, got {self.std}")

    @property
    def mode(self) -> str:
        """The concrete preprocessing: ``square`` resolved to the tower's ``native`` mode."""
        return self.native if self.preprocess == "square" else self.preprocess

    @property
    def fill(self) -> tuple[int, int, int]:
        """The mean colour in 8-bit RGB (``fill_rounding``): the colour of padding and of
        transparent pixels. After normalisation it is (up to 8-bit rounding) zero."""
        offset = 0.0 if self.fill_rounding == "floor" else 0.5
        return tuple(int(min(255, max(0, m * 255.0 + offset))) for m in self.mean)  # type: ignore[return-value]

    def with_preprocess(self, preprocess: str) -> "ImageSpec":
        """The same spec with another aspect handling (validated)."""
        return replace(self, preprocess=preprocess)

    @property
    def views(self) -> tuple["ImageSpec", ...]:
        """The normalisations an image is prepared with, in channel order: this spec alone
        (a :class:`StackedImageSpec` has one per tower)."""
        return (self,)

    @property
    def channels(self) -> int:
        """Channels of a prepared image: 3 per view."""
        return 3 * len(self.views)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        model_type: str,
        size: int,
        preprocess: str = "pad",
        fill_rounding: str = "floor",
    ) -> "ImageSpec":
        """Read mean/std and the processor's geometry from the tower's
        ``preprocessor_config.json`` (hub name or local dir)."""
        from transformers.utils import cached_file

        mean, std = _DEFAULT_NORM.get(model_type, _HALF)
        native, crop_from = _DEFAULT_NATIVE.get(model_type), None
        path = cached_file(
            name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
        )
        if path is not None:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            mean = tuple(cfg.get("image_mean", mean))
            std = tuple(cfg.get("image_std", std))
            native, crop_from = native_of_processor(cfg, size)
        return cls(
            size=size,
            mean=mean,
            std=std,
            preprocess=preprocess,
            native=native,
            crop_from=crop_from,
            fill_rounding=fill_rounding,
        )


Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class StackedImageSpec(ImageSpec):
    """One image prepared for several towers at once (a fused tower).

    Every view has this spec's geometry (size, aspect handling: the same pixels reach every
    tower, so their patches line up); view 0 has this spec's mean/std, view k those of
    ``others[k - 1]``, and each view pads with its own mean colour. A prepared image holds the
    views' channels one after another, ``3 * (1 + len(others))`` of them; view k is exactly what
    a single tower with that normalisation is given.

    Args:
        others: ``(mean, std)`` of every further view, in tower order.
    """

    others: tuple[Normalisation, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        # Each normalisation is checked (and made tuples of floats) as a spec of its own.
        checked = [replace(self.views[0], mean=m, std=s) for m, s in self.others]
        object.__setattr__(self, "others", tuple((v.mean, v.std) for v in checked))

    @property
    def views(self) -> tuple[ImageSpec, ...]:
        base = ImageSpec(**{f.name: getattr(self, f.name) for f in fields(ImageSpec)})
        return (base, *(replace(base, mean=m, std=s) for m, s in self.others))

    @classmethod
    def of(cls, specs: list[ImageSpec]) -> "StackedImageSpec":
        """The first spec's geometry with every spec's normalisation."""
        first = specs[0]
        base = {f.name: getattr(first, f.name) for f in fields(ImageSpec)}
        return cls(**base, others=tuple((s.mean, s.std) for s in specs[1:]))


def _check_choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{option}: unknown mode {value!r}; allowed: {', '.join(allowed)}")


def _side(value: Any, key: str) -> Optional[int]:
    """``value`` as an int, or its ``key`` entry when it is a dict (processor configs use both)."""
    if isinstance(value, int):
        return value
    return value.get(key) if isinstance(value, dict) else None


def native_of_processor(cfg: dict[str, Any], size: int) -> tuple[Optional[str], Optional[int]]:
    """``(native, crop_from)`` of a transformers image processor config (``preprocessor_config.json``)
    for a ``size x size`` tower: ``("resize", None)`` for a squash to ``size`` (SigLIP),
    ``("crop", s)`` for "shortest edge to ``s``, centre crop ``size``" (CLIP; a bare int
    ``size`` is the shortest edge), ``(None, None)`` for anything else."""
    crop = cfg.get("crop_size")
    crops_to_size = crop is None or (
        _side(crop, "height") == size and _side(crop, "width") in (size, None)
    )
    resize = cfg.get("size")
    shortest = _side(resize, "shortest_edge")
    if shortest is not None:
        if cfg.get("do_center_crop") and crop is not None and crops_to_size and shortest >= size:
            return "crop", shortest
        return None, None
    if isinstance(resize, dict) and resize.get("height") == size and resize.get("width") == size:
        if not cfg.get("do_center_crop") or crops_to_size:
            return "resize", None
    return None, None
