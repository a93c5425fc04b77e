"""What a vision tower expects of an image: size and normalisation."""
from __future__ import annotations

import json
from dataclasses import dataclass

from transformers.utils import cached_file

# Defaults by model type, for towers saved without a preprocessor_config.json.
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_DEFAULT_NORM = {"clip_vision_model": _OPENAI_CLIP, "siglip_vision_model": _HALF}


@dataclass(frozen=True)
class ImageSpec:
    """Input size and per-channel normalisation of a vision tower."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_pretrained(cls, name_or_path: str, model_type: str, size: int) -> "ImageSpec":
        """Read mean/std from the tower's ``preprocessor_config.json`` (hub name or local dir)."""
        mean, std = _DEFAULT_NORM.get(model_type, _HALF)
        path = cached_file(name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        if path is not None:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            mean = tuple(cfg.get("image_mean", mean))
            std = tuple(cfg.get("image_std", std))
        return cls(size=size, mean=mean, std=std)
