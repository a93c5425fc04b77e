"""What a vision tower expects of an image: size, normalisation and how a non-square image
is fitted into its square input."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Literal

from lmm.errors import ConfigError

# How an image of any aspect ratio becomes the tower's ``size x size`` input:
#   resize:    squash to size x size (aspect ratio not kept);
#   pad:       pad the image to a square with the mean colour, centred, then resize
#              (LLaVA-1.5's ``image_aspect_ratio: pad``, "expand2square");
#   letterbox: scale so the longer side is ``size`` (aspect kept), then pad the shorter side
#              to ``size`` with the mean colour, centred.
# When the padding is odd the extra row/column goes to the bottom/right.
Preprocess = Literal["resize", "pad", "letterbox"]
PREPROCESS_MODES: tuple[str, ...] = ("resize", "pad", "letterbox")

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


@dataclass(frozen=True)
class ImageSpec:
    """Input size, per-channel normalisation and aspect handling of a vision tower.

    The tower builds it; the data side receives it through ``Processor.image_spec`` and
    ``ImageTransform`` applies it, so train and eval images are prepared the same way.

    Args:
        size: Side of the tower's square input in pixels.
        mean: Per-channel mean on the 0-1 scale (subtracted before dividing by ``std``).
        std: Per-channel standard deviation on the 0-1 scale.
        preprocess: How a non-square image becomes ``size x size``: ``resize`` (squash),
            ``pad`` (pad to a square with the mean colour, then resize; LLaVA-1.5) or
            ``letterbox`` (scale to fit keeping the aspect ratio, then pad with the mean colour).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess: Preprocess = "pad"

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS_MODES:
            raise ConfigError(
                f"model.vision.image_preprocess: unknown mode {self.preprocess!r}; "
                f"allowed: {', '.join(PREPROCESS_MODES)}"
            )
        if int(self.size) != self.size or self.size < 1:
            raise ConfigError(f"image size must be a positive integer, got {self.size!r}")
        # JSON configs give lists; a frozen, hashable spec wants tuples of floats.
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ConfigError(f"image {name} needs 3 values (R, G, B), got {value}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"image std must be positive, got {self.std}")

    @property
    def fill(self) -> tuple[int, int, int]:
        """The mean colour in 8-bit RGB: the colour of padding and of transparent pixels.

        After normalisation it is (up to 8-bit rounding) zero, i.e. "no content"."""
        return tuple(int(min(255, max(0, m * 255.0 + 0.5))) for m in self.mean)  # type: ignore[return-value]

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
        cls, name_or_path: str, model_type: str, size: int, preprocess: str = "pad"
    ) -> "ImageSpec":
        """Read mean/std from the tower's ``preprocessor_config.json`` (hub name or local dir)."""
        from transformers.utils import cached_file

        mean, std = _DEFAULT_NORM.get(model_type, _HALF)
        path = cached_file(
            name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
        )
        if path is not None:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            mean = tuple(cfg.get("image_mean", mean))
            std = tuple(cfg.get("image_std", std))
        return cls(size=size, mean=mean, std=std, preprocess=preprocess)


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
