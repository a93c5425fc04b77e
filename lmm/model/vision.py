"""Vision towers: every kind returns patch features ``[B, N, D]`` and exposes its blocks.

A tower is a class plus an entry in ``VISION_TOWERS``; the YAML names the entry.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmm.model.image_spec import ImageSpec
from lmm.model.loading import load_pretrained
from lmm.registry import ConfigError, Registry


@dataclass
class VisionConfig:
    """Which vision tower to build.

    Args:
        kind: Registry name of the tower implementation (``hf``: transformers CLIP/SigLIP vision models).
        name_or_path: Hub name or local directory of the pretrained tower.
        feature_layer: Hidden layer whose output feeds the connector (-2 = second to last, as LLaVA).
        select: Token strategy: ``auto`` drops CLIP's CLS token and keeps every SigLIP patch;
            ``patch`` always drops the first token; ``full`` keeps all tokens.
    """

    kind: str = "hf"
    name_or_path: str = "google/siglip-so400m-patch14-384"
    feature_layer: int = -2
    select: Literal["auto", "patch", "full"] = "auto"


class VisionTower(nn.Module, ABC):
    """Interface every tower implements."""

    image_spec: ImageSpec
    hidden_size: int
    num_tokens: int

    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks in forward order (for partial freezing)."""

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, num_tokens, hidden_size]``."""


VISION_TOWERS: Registry[type[VisionTower]] = Registry("vision tower")

# transformers vision models whose first token is a CLS token.
_HAS_CLS = {"clip_vision_model"}


def _find_blocks(model: nn.Module, count: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding the model's ``count`` transformer layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {count} layers found")


@VISION_TOWERS.register("hf")
class HFVisionTower(VisionTower):
    """A transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` (anything AutoModel loads).

    Layers after ``feature_layer`` and the final norm/pooling head never influence the
    features, so they are removed at load time: they cost compute and would otherwise
    count as trainable parameters that never receive a gradient.
    """

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from transformers import AutoModel

        model = load_pretrained(AutoModel, cfg.name_or_path, "vision tower", dtype=dtype)
        config = model.config
        n_layers = config.num_hidden_layers
        keep = cfg.feature_layer % (n_layers + 1)  # hidden_states has n_layers + 1 entries
        if not 1 <= keep <= n_layers:
            raise ConfigError(
                f"model.vision.feature_layer={cfg.feature_layer} selects the embedding output of "
                f"a {n_layers}-layer tower; use a value in [-{n_layers}, -1] or [1, {n_layers}]"
            )
        parent, attr, layers = _find_blocks(model, n_layers)
        setattr(parent, attr, nn.ModuleList(list(layers)[:keep]))
        config.num_hidden_layers = keep
        for name, module in list(model.named_modules()):
            if name.rpartition(".")[2] in ("post_layernorm", "head") and name:
                p, _, a = name.rpartition(".")
                setattr(model.get_submodule(p), a, nn.Identity())
        if hasattr(config, "vision_use_head"):
            config.vision_use_head = False

        self.model = model
        self.model_type = config.model_type
        drop_first = {"auto": config.model_type in _HAS_CLS, "patch": True, "full": False}[cfg.select]
        self._skip = 1 if drop_first else 0
        grid = config.image_size // config.patch_size
        has_cls = config.model_type in _HAS_CLS
        self.num_tokens = grid * grid + (1 if has_cls else 0) - self._skip
        self.hidden_size = config.hidden_size
        self.image_spec = ImageSpec.from_pretrained(cfg.name_or_path, config.model_type, config.image_size)

    def blocks(self) -> nn.ModuleList:
        return _find_blocks(self.model, self.model.config.num_hidden_layers)[2]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-1][:, self._skip :]


def build_vision_tower(cfg: VisionConfig, dtype: torch.dtype = torch.float32) -> VisionTower:
    return VISION_TOWERS.get(cfg.kind, option="model.vision.kind")(cfg, dtype=dtype)
