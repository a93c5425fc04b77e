"""Kind ``open_clip``: the image tower of an open_clip CLIP model (open_clip's own ViT).

Loading goes through ``open_clip.create_model(source, require_pretrained=True)``:
``hf-hub:ORG/REPO`` as open_clip resolves it, and a local directory as open_clip's own
``local-dir:`` source (``open_clip_config.json`` with ``model_cfg`` / ``preprocess_cfg``, plus
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``: what a
``hf download ORG/REPO --local-dir DIR`` of an open_clip hub repo holds).
``require_pretrained`` turns open_clip's "no weights found, random init" warning into an error.

The text tower is dropped after loading; so are ``ln_post``, the attention pooler and the
projection, which come after the selected block.
"""

from __future__ import annotations

import torch
from torch import nn

from lmm.errors import ConfigError, MissingWeightsError
from lmm.model.towers.base import (
    VisionConfig,
    VisionTower,
    library_source,
    load_or_explain,
    resolve_feature_layer,
    tokens_to_skip,
)
from lmm.visual.image_spec import ImageSpec

_EXPECTS = "open_clip_config.json and open_clip_model.safetensors (or open_clip_pytorch_model.bin)"


class OpenCLIPTower(VisionTower):
    """An open_clip ``VisionTransformer``: one CLS token, then the patch grid.

    ``select: auto`` drops the CLS token (``grid*grid`` tokens); ``full`` keeps it.
    """

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        if cfg.image_size is not None:
            raise ConfigError(
                f"model.vision.image_size={cfg.image_size}: kind 'open_clip' takes its checkpoint's own input "
                "size; leave model.vision.image_size unset"
            )
        source = library_source(cfg.name_or_path)
        if not source.startswith(("hf-hub:", "local-dir:")):
            # open_clip would build a built-in architecture with random weights: refuse, say what to write.
            raise MissingWeightsError(
                f"cannot load open_clip vision tower weights from {cfg.name_or_path!r}: a bare open_clip "
                "architecture name carries no weights. Set model.vision.name_or_path to 'hf-hub:ORG/REPO' (an "
                "open_clip repo, e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K) or to a local directory "
                f"holding {_EXPECTS}"
            )
        model = load_or_explain(
            lambda: open_clip.create_model(source, require_pretrained=True),
            cfg.name_or_path,
            "open_clip vision tower",
            _EXPECTS,
        )
        visual = model.visual
        preprocess = dict(getattr(visual, "preprocess_cfg", {}) or {})
        del model  # the text tower is not needed
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(
                f"model.vision.name_or_path={cfg.name_or_path!r}: its open_clip image tower is a "
                f"{type(visual).__name__}; kind 'open_clip' supports open_clip's VisionTransformer. For a timm "
                "trunk use kind timm with the trunk's timm name; for SigLIP use kind hf"
            )
        height, width = visual.image_size
        if height != width:
            raise ConfigError(
                f"model.vision.name_or_path={cfg.name_or_path!r}: image size {height}x{width} is not square"
            )
        n_blocks = len(visual.transformer.resblocks)
        keep = resolve_feature_layer(cfg.feature_layer, n_blocks, default=-2)
        visual.prune_intermediate_layers(indices=[keep - 1], prune_norm=True, prune_head=True)
        # Poolers follow the blocks and never see our features.
        visual.attn_pool = None
        if hasattr(visual, "attn_pool_contrastive"):
            visual.attn_pool_contrastive = None
        self.model = visual.to(dtype)
        self._index = keep - 1
        self._skip = tokens_to_skip(cfg.select, 1, kind="open_clip")
        grid_h, grid_w = visual.grid_size
        self.num_tokens = grid_h * grid_w + 1 - self._skip
        self.hidden_size = int(visual.transformer.width)
        self.image_spec = ImageSpec(
            size=height,
            mean=preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN),
            std=preprocess.get("std", open_clip.OPENAI_DATASET_STD),
            preprocess=cfg.image_preprocess,
            # open_clip's transform (torchvision Resize + CenterCrop, rounded offsets) is not
            # reproduced, so `square` is refused rather than approximated.
            native=None,
            fill_rounding=cfg.fill_rounding,
        )

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_intermediates(
            pixel_values,
            indices=[self._index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self._skip == 0,
        )
        patches = out["image_intermediates"][0]
        if self._skip == 0:
            return torch.cat([out["image_intermediates_prefix"][0], patches], dim=1)
        return patches
