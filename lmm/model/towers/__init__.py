"""Vision towers: the interface (``base``), one module per kind, and the registry of kinds.

A kind is a ``VisionTower`` subclass called with ``(VisionConfig, dtype=...)`` plus one exact-name
entry below; ``model.vision.kind`` names the entry. The heavy libraries (transformers models,
open_clip, timm) are imported only when a tower of that kind is built.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from lmm.errors import ConfigError
from lmm.model.towers.base import SELECT_MODES, VisionConfig, VisionTower
from lmm.model.towers.fused import FusedTower
from lmm.model.towers.hf import HFVisionTower
from lmm.model.towers.open_clip import OpenCLIPTower
from lmm.model.towers.timm import TimmTower
from lmm.registry import Registry

__all__ = ["VISION_TOWERS", "VisionConfig", "VisionTower", "build_vision_tower"]

VISION_TOWERS: Registry[Callable[..., VisionTower]] = Registry("vision tower")
VISION_TOWERS.add("hf", HFVisionTower)
VISION_TOWERS.add("open_clip", OpenCLIPTower)
VISION_TOWERS.add("timm", TimmTower)
# Builds its towers from this same registry.
VISION_TOWERS.add("fused", partial(FusedTower, kinds=VISION_TOWERS))


def build_vision_tower(cfg: VisionConfig, dtype: torch.dtype = torch.float32) -> VisionTower:
    """The tower ``cfg.kind`` names, built from ``cfg``."""
    if cfg.select not in SELECT_MODES:
        raise ConfigError(
            f"model.vision.select: unknown token strategy {cfg.select!r}; allowed: {', '.join(SELECT_MODES)}"
        )
    if cfg.fused is not None and cfg.kind != "fused":
        raise ConfigError(
            f"model.vision.fused is set but model.vision.kind is {cfg.kind!r}; set kind: fused or unset fused"
        )
    return VISION_TOWERS.get(cfg.kind, option="model.vision.kind")(cfg, dtype=dtype)
