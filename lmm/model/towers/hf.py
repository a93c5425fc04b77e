"""Kind ``hf``: transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model`` /
``Dinov2WithRegistersModel``.

``name_or_path`` may hold a full CLIP / SigLIP checkpoint (text and vision, as the hub repos
``openai/clip-vit-large-patch14-336`` and ``google/siglip-so400m-patch14-384`` do) or a vision
model alone; the vision class loads only the vision weights from either. DINOv2
(``facebook/dinov2-*``, ``facebook/dinov2-with-registers-*``) is a vision model alone.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from lmm.errors import ConfigError
from lmm.model.towers.base import (
    VisionConfig,
    VisionTower,
    load_or_explain,
    resolve_feature_layer,
    tokens_to_skip,
)
from lmm.visual.image_spec import ImageSpec

# model_type (of the checkpoint's config.json) -> (transformers vision class, has a CLS token).
# Exact keys: a model type not listed here is refused rather than guessed.
HF_VISION_MODELS: dict[str, tuple[str, bool]] = {
    "clip": ("CLIPVisionModel", True),
    "clip_vision_model": ("CLIPVisionModel", True),
    "siglip": ("SiglipVisionModel", False),
    "siglip_vision_model": ("SiglipVisionModel", False),
    "dinov2": ("Dinov2Model", True),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", True),
}
# DINOv2 interpolates its position embeddings to any input on every forward, and its hub
# checkpoints say image_size 518 while their processor (BitImageProcessor) crops 224 px.
_DINOV2 = ("dinov2", "dinov2_with_registers")

_EXPECTS = "config.json and model.safetensors (a transformers CLIP, SigLIP or DINOv2 checkpoint)"


def _processor_crop_size(name_or_path: str) -> int:
    """The crop side of the tower's ``preprocessor_config.json``; without one,
    ``BitImageProcessor``'s default (the processor transformers pairs with DINOv2)."""
    from transformers import BitImageProcessor
    from transformers.utils import cached_file

    crop = BitImageProcessor.crop_size
    path = cached_file(
        name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
    )
    if path is not None:
        with open(path, encoding="utf-8") as f:
            crop = json.load(f).get("crop_size", crop)
    return int(crop["height"] if isinstance(crop, dict) else crop)


def _find_blocks(model: nn.Module, count: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding the model's ``count`` transformer layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {count} layers found")


class HFVisionTower(VisionTower):
    """A transformers CLIP, SigLIP or DINOv2 vision model.

    Layers after ``feature_layer`` and the final norm / pooling head are removed at load time
    (DINOv2's final ``layernorm`` and its unused pretraining ``mask_token`` too). Token
    strategy ``auto`` drops CLIP's CLS token, DINOv2's CLS and register tokens, and keeps every
    SigLIP patch (SigLIP has no CLS: a 27x27 grid gives 729 tokens, not 728).
    """

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        import transformers

        what = "transformers vision tower"
        config = load_or_explain(
            lambda: transformers.AutoConfig.from_pretrained(cfg.name_or_path),
            cfg.name_or_path,
            what,
            _EXPECTS,
        )
        if config.model_type not in HF_VISION_MODELS:
            raise ConfigError(
                f"model.vision.name_or_path={cfg.name_or_path!r} is a {config.model_type!r} model; kind 'hf' "
                f"supports model types {', '.join(sorted(HF_VISION_MODELS))} (other towers: kinds open_clip, timm)"
            )
        class_name, has_cls = HF_VISION_MODELS[config.model_type]
        model_class = getattr(transformers, class_name)
        model = load_or_explain(
            lambda: model_class.from_pretrained(cfg.name_or_path, dtype=dtype),
            cfg.name_or_path,
            what,
            _EXPECTS,
        )
        config = model.config  # the vision config, also when the checkpoint was a full CLIP/SigLIP
        n_layers = config.num_hidden_layers
        keep = resolve_feature_layer(cfg.feature_layer, n_layers, default=-2)
        parent, attr, layers = _find_blocks(model, n_layers)
        setattr(parent, attr, nn.ModuleList(list(layers)[:keep]))
        config.num_hidden_layers = keep
        for name, _ in list(model.named_modules()):
            if name and name.rpartition(".")[2] in ("post_layernorm", "head"):
                p, _, a = name.rpartition(".")
                setattr(model.get_submodule(p), a, nn.Identity())
        if hasattr(config, "vision_use_head"):
            config.vision_use_head = False
        if config.model_type in _DINOV2:
            model.layernorm = nn.Identity()
            # Only masked-image pretraining uses it; left in, it would train without a gradient.
            model.embeddings.mask_token = None
            config.use_mask_token = False
            # Its backbone fields name every layer; a saved copy must name only the kept ones.
            config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, keep + 1)]
            config.set_output_features_output_indices(out_features=None, out_indices=None)

        self.model = model
        self.model_type = config.model_type
        self.has_cls = has_cls
        prefix = (1 + getattr(config, "num_register_tokens", 0)) if has_cls else 0
        self._skip = tokens_to_skip(cfg.select, prefix, kind="hf")
        native = (
            _processor_crop_size(cfg.name_or_path)
            if config.model_type in _DINOV2
            else config.image_size
        )
        size = native if cfg.image_size is None else cfg.image_size
        if size < config.patch_size:
            raise ConfigError(
                f"model.vision.image_size={size} is smaller than the tower's {config.patch_size} px patches"
            )
        # CLIP / SigLIP interpolate only when asked; DINOv2 always does.
        self._interpolate = size != config.image_size and config.model_type not in _DINOV2
        grid = size // config.patch_size
        self.num_tokens = grid * grid + prefix - self._skip
        self.hidden_size = config.hidden_size
        self.image_spec = ImageSpec.from_pretrained(
            cfg.name_or_path,
            config.model_type,
            size,
            preprocess=cfg.image_preprocess,
            fill_rounding=cfg.fill_rounding,
        )

    def blocks(self) -> nn.ModuleList:
        return _find_blocks(self.model, self.model.config.num_hidden_layers)[2]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        extra = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, **extra)
        return out.hidden_states[-1][:, self._skip :]
