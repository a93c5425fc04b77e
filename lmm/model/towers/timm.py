"""Kind ``timm``: a timm ViT (patch tokens) or CNN (its feature map's h*w grid cells as tokens).

Loading always goes through ``timm.create_model(source, pretrained=True)``, the call timm makes
for a hub name; a local directory is passed as timm's own ``local-dir:`` source, so a
directory written by ``timm.models.save_for_hf`` (``config.json`` + ``model.safetensors``, or a
``hf download timm/NAME --local-dir DIR``) loads exactly like the hub repo.

Blocks are the model's ``feature_info`` taps that hold parameters: every transformer block for
a ViT, every stage for a CNN (ResNet ``layer1..4``, ConvNeXt ``stages.0..3``); the stem / patch
embedding comes before them. The features are timm's ``forward_intermediates`` output at the
selected block, after the model has been pruned to it (``prune_intermediate_layers``: later
blocks, final norm and classifier head removed).

``model.vision.image_size`` other than the pretrained input size: a ViT is resized with timm's
own ``set_input_size`` right after loading (position embeddings resampled once, bicubic with
antialiasing: the same table ``create_model(..., img_size=S)`` gives, as Prismatic builds its
towers); a CNN takes any size as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from lmm.errors import ConfigError
from lmm.model.towers.base import (
    VisionConfig,
    VisionTower,
    has_parameters,
    library_source,
    load_or_explain,
    resolve_feature_layer,
    tokens_to_skip,
)
from lmm.visual.image_spec import ImageSpec

_EXPECTS = "timm's config.json and model.safetensors, as written by timm.models.save_for_hf"


def _hub_repo(source: str) -> str:
    """The hub repository behind a timm source (timm hosts its pretrained weights as ``timm/NAME``)."""
    if source.startswith("hf-hub:"):
        return source.removeprefix("hf-hub:")
    return f"timm/{source}"


class TimmTower(VisionTower):
    """A timm backbone.

    ViT family (models with ``num_prefix_tokens``): tokens are the patch tokens of the selected
    block (prefix tokens, i.e. CLS and registers, dropped under ``select: auto``). CNN: the
    selected stage's map ``[B, C, h, w]`` flattened row-major into ``h*w`` tokens of width C.
    """

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        import timm

        source = library_source(cfg.name_or_path)
        model = load_or_explain(
            lambda: timm.create_model(source, pretrained=True),
            cfg.name_or_path,
            "timm vision tower",
            _EXPECTS,
            hub_repo=_hub_repo(source),
        )
        data = timm.data.resolve_model_data_config(model)
        _, height, width = data["input_size"]
        if cfg.image_size is not None and (cfg.image_size, cfg.image_size) != (height, width):
            self._resize_input(model, cfg.image_size, cfg.name_or_path)
            height = width = cfg.image_size
        if height != width:
            raise ConfigError(
                f"model.vision.name_or_path={cfg.name_or_path!r}: timm input size {height}x{width} is not "
                "square; lmm towers take square images (set model.vision.image_size)"
            )
        for needed in ("forward_intermediates", "prune_intermediate_layers", "feature_info"):
            if not hasattr(model, needed):
                raise ConfigError(
                    f"model.vision.name_or_path={cfg.name_or_path!r}: timm model {type(model).__name__} has no "
                    f"{needed}(); kind 'timm' supports models with timm's feature-extraction API "
                    "(ViTs, ResNets, ConvNeXts, ...)"
                )
        self.is_vit = getattr(model, "num_prefix_tokens", None) is not None
        taps = [info["module"] for info in model.feature_info]
        block_names = [name for name in taps if has_parameters(model.get_submodule(name))]
        keep = resolve_feature_layer(
            cfg.feature_layer, len(block_names), default=-2 if self.is_vit else -1
        )
        self._index = taps.index(block_names[keep - 1])  # forward_intermediates counts every tap
        self.hidden_size = int(model.feature_info[self._index]["num_chs"])
        model.prune_intermediate_layers(indices=[self._index], prune_norm=True, prune_head=True)
        self._block_names = block_names[:keep]
        self.model = model.to(dtype)

        if self.is_vit:
            self._prefix = int(model.num_prefix_tokens)
            self._skip = tokens_to_skip(cfg.select, self._prefix, kind="timm")
            grid_h, grid_w = model.patch_embed.grid_size
            self.num_tokens = grid_h * grid_w + self._prefix - self._skip
        else:
            if cfg.select == "patch":
                raise ConfigError(
                    "model.vision.select='patch' drops the first token, but a CNN has no CLS token: every "
                    "token is a grid cell; use auto"
                )
            # A CNN's grid size depends on padding arithmetic: measure it once.
            was_training = model.training
            with torch.no_grad():
                probe = torch.zeros(1, 3, height, width, dtype=dtype)
                self.num_tokens = int(self.eval()(probe).shape[1])
            self.train(was_training)
        # native=None: timm's eval transform (torchvision resize + CenterCrop with rounded
        # offsets, crop_pct) is not reproduced, so `square` is refused rather than approximated.
        self.image_spec = ImageSpec(
            size=height,
            mean=data["mean"],
            std=data["std"],
            preprocess=cfg.image_preprocess,
            native=None,
            fill_rounding=cfg.fill_rounding,
        )

    @staticmethod
    def _resize_input(model: nn.Module, size: int, name_or_path: str) -> None:
        """Make ``model`` take ``size x size`` images (see the module docstring)."""
        if getattr(model, "num_prefix_tokens", None) is None:
            return  # a CNN: no position table, any size
        if not hasattr(model, "set_input_size"):
            raise ConfigError(
                f"model.vision.image_size={size}: timm model {type(model).__name__} ({name_or_path!r}) cannot "
                "change its input size (no set_input_size); leave model.vision.image_size unset"
            )
        model.set_input_size(img_size=(size, size))

    def train(self, mode: bool = True) -> "TimmTower":
        """Train mode, except frozen BatchNorm layers: they keep their pretrained running
        statistics (a frozen stage must compute what it computed when it was trained).
        Freeze policies are applied before training starts, so Lightning's ``train()`` sees them."""
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    params = list(module.parameters())
                    if params and not any(p.requires_grad for p in params):
                        module.eval()
        return self

    def blocks(self) -> nn.ModuleList:
        # A fresh list each call: registering it would duplicate the parameters' names.
        return nn.ModuleList([self.model.get_submodule(name) for name in self._block_names])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            fmap = self.model.forward_intermediates(
                pixel_values, indices=[self._index], intermediates_only=True
            )[0]
            return fmap.flatten(2).transpose(1, 2)
        with_prefix = self._prefix > 0 and self._skip < self._prefix
        out = self.model.forward_intermediates(
            pixel_values,
            indices=[self._index],
            intermediates_only=True,
            output_fmt="NLC",
            return_prefix_tokens=with_prefix,
        )[0]
        if not with_prefix:
            return out[:, self._skip - self._prefix :] if self._skip > self._prefix else out
        patches, prefix = out
        return torch.cat([prefix, patches], dim=1)[:, self._skip :]
