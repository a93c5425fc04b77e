"""Kind ``fused``: several towers run on the same image, their patch features joined.

Prismatic's DINO-SigLIP (``prismatic/models/backbones/vision/dinosiglip_vit.py``,
``DinoSigLIPViTBackbone.forward``: ``torch.cat([dino, siglip], dim=2)``) is ``join: concat``;
TinyLLaVA's MoF (``tinyllava/model/vision_tower/mof.py`` + ``connector/mof_mlp.py``: CLIP and
DINOv2 tokens alternating, each through its own MLP) is ``join: interleave`` with connector
``mof_mlp``.

Input: the tower's ``image_spec`` is a ``StackedImageSpec``: the data side prepares one view of
the image per tower (the first tower's geometry, each tower's own mean/std and padding colour)
and stacks them along channels, so tower k receives channels ``3k .. 3k+2``: exactly the tensor
it would be given alone. Nothing is re-derived from another tower's normalisation.

Join (N = the first tower's tokens, D_k = tower k's width):

- ``concat``: ``[B, N, D_0 + D_1 + ...]``, token i = every tower's token i side by side. A tower
  whose token count differs from the first's (another patch size) has its square patch grid
  resized to the first's grid with bilinear interpolation (``align_corners=False``, antialiased
  when shrinking) before the join.
- ``interleave``: ``[B, K * N, D]`` for K towers of equal width and token count; token
  ``i * K + k`` is tower k's token i (TinyLLaVA: ``merged[:, 0::2] = clip``, ``[:, 1::2] = dino``).

Freezing, LoRA, activation checkpointing and FSDP units apply to every tower: ``blocks()`` lists
each tower's blocks in tower order, ``sub_towers()`` the towers (``partial`` freezing counts
blocks within each tower).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import fields
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmm.errors import ConfigError, MissingWeightsError
from lmm.model.towers.base import VisionConfig, VisionTower
from lmm.model.towers.fused_config import JOIN_MODES
from lmm.registry import Registry
from lmm.visual.image_spec import PREPROCESS_MODES, StackedImageSpec

# VisionConfig fields a fused tower takes per tower (model.vision.fused.towers) instead.
_PER_TOWER = ("name_or_path", "feature_layer", "select", "image_size")


@contextmanager
def _as_tower_option(index: int) -> Iterator[None]:
    """Errors of tower ``index`` name its own options (``model.vision.fused.towers[i].X``)."""
    try:
        yield
    except (ConfigError, MissingWeightsError) as err:
        message = str(err).replace("model.vision.", f"model.vision.fused.towers[{index}].")
        raise type(err)(message) from err


def _resize_grid(features: torch.Tensor, side: int) -> torch.Tensor:
    """``[B, s*s, D]`` row-major patch tokens -> ``[B, side*side, D]`` (bilinear)."""
    b, n, d = features.shape
    s = math.isqrt(n)
    grid = features.transpose(1, 2).reshape(b, d, s, s)
    grid = F.interpolate(
        grid, size=(side, side), mode="bilinear", align_corners=False, antialias=side < s
    )
    return grid.flatten(2).transpose(1, 2)


class FusedTower(VisionTower):
    """The towers of ``model.vision.fused`` on one image, joined by ``concat`` or ``interleave``."""

    def __init__(
        self,
        cfg: VisionConfig,
        dtype: torch.dtype = torch.float32,
        *,
        kinds: Registry[Callable[..., VisionTower]],
    ) -> None:
        super().__init__()
        fused = cfg.fused
        self._check(cfg)
        towers = []
        for i, sub in enumerate(fused.towers):
            with _as_tower_option(i):
                sub_cfg = VisionConfig(
                    kind=sub.kind,
                    name_or_path=sub.name_or_path,
                    feature_layer=sub.feature_layer,
                    select=sub.select,
                    image_size=sub.image_size,
                    image_preprocess=cfg.image_preprocess,
                    fill_rounding=cfg.fill_rounding,
                )
                towers.append(kinds.get(sub.kind, option="model.vision.kind")(sub_cfg, dtype=dtype))
        self.towers = nn.ModuleList(towers)
        self.join = fused.join

        sizes = [t.image_spec.size for t in towers]
        if len(set(sizes)) > 1:
            raise ConfigError(
                f"model.vision.fused.towers take images of {', '.join(f'{s} px' for s in sizes)}; the towers of a "
                f"fused tower see the same pixels, so set image_size on the towers to one size (e.g. {sizes[0]})"
            )
        counts = [t.num_tokens for t in towers]
        widths = [t.hidden_size for t in towers]
        if self.join == "concat":
            self._side = self._concat_side(counts)
            self.num_tokens, self.hidden_size = counts[0], sum(widths)
        else:
            if len(set(counts)) > 1 or len(set(widths)) > 1:
                raise ConfigError(
                    "model.vision.fused.join=interleave needs towers of equal tokens and width; they give "
                    + ", ".join(f"{n} tokens x {d}" for n, d in zip(counts, widths))
                    + " (set image_size for equal grids; use join: concat for unequal widths)"
                )
            self.num_tokens, self.hidden_size = len(towers) * counts[0], widths[0]
            self.token_groups = len(towers)
        self.image_spec = StackedImageSpec.of([t.image_spec for t in towers])

    @staticmethod
    def _check(cfg: VisionConfig) -> None:
        fused = cfg.fused
        if fused is None:
            raise ConfigError(
                "model.vision.kind=fused needs model.vision.fused: {towers: [{kind, name_or_path}, ...], join}"
            )
        defaults = {f.name: f.default for f in fields(VisionConfig)}
        moved = [name for name in _PER_TOWER if getattr(cfg, name) != defaults[name]]
        if moved:
            raise ConfigError(
                f"model.vision.{moved[0]} does not apply to kind fused: set it per tower, "
                f"model.vision.fused.towers[i].{moved[0]}"
            )
        if len(fused.towers) < 2:
            raise ConfigError(
                f"model.vision.fused.towers: a fused tower needs at least two towers, got {len(fused.towers)}"
            )
        unnamed = [i for i, t in enumerate(fused.towers) if not t.name_or_path]
        if unnamed:
            raise ConfigError(
                f"model.vision.fused.towers[{unnamed[0]}].name_or_path is empty; set the tower's hub name or directory"
            )
        nested = [i for i, t in enumerate(fused.towers) if t.kind == "fused"]
        if nested:
            raise ConfigError(
                f"model.vision.fused.towers[{nested[0]}].kind=fused: fused towers do not nest"
            )
        if fused.join not in JOIN_MODES:
            raise ConfigError(
                f"model.vision.fused.join: unknown mode {fused.join!r}; allowed: {', '.join(JOIN_MODES)}"
            )
        if (
            cfg.image_preprocess not in PREPROCESS_MODES
        ):  # checked here: it is the fused tower's option
            raise ConfigError(
                f"model.vision.image_preprocess: unknown mode {cfg.image_preprocess!r}; "
                f"allowed: {', '.join(PREPROCESS_MODES)}"
            )
        if cfg.anyres is not None:
            raise ConfigError(
                "model.vision.anyres does not work with kind fused (AnyRes crops are cut from one padded canvas, "
                "not per tower); unset model.vision.anyres or use a single tower"
            )
        if cfg.video is not None and fused.join == "interleave":
            raise ConfigError(
                "model.vision.video pools each frame's square token grid, which join=interleave does not give; "
                "unset model.vision.video or use model.vision.fused.join: concat"
            )

    @staticmethod
    def _concat_side(counts: list[int]) -> int:
        """Side of the first tower's patch grid when another tower's grid must be resized to it."""
        if len(set(counts)) == 1:
            return 0  # nothing to resize
        for i, n in enumerate(counts):
            if math.isqrt(n) ** 2 != n:
                raise ConfigError(
                    f"model.vision.fused.join=concat: the towers give {', '.join(map(str, counts))} tokens, so their "
                    f"patch grids must be resized to one, but towers[{i}]'s {n} tokens are no square grid "
                    f"(select: full keeps a CLS token; use select: auto)"
                )
        return math.isqrt(counts[0])

    def sub_towers(self) -> list[VisionTower]:
        return list(self.towers)

    def blocks(self) -> nn.ModuleList:
        # A fresh list each call: registering it would duplicate the parameters' names.
        return nn.ModuleList([b for t in self.towers for b in t.blocks()])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = 3 * len(self.towers)
        if pixel_values.shape[1] != expected:
            raise ValueError(
                f"fused tower: pixel_values have {pixel_values.shape[1]} channels; it takes {expected} "
                "(one RGB view per tower, as ImageTransform prepares them with its image_spec)"
            )
        features = [t(pixel_values[:, 3 * k : 3 * k + 3]) for k, t in enumerate(self.towers)]
        if self.join == "interleave":
            b, n, d = features[0].shape
            return torch.stack(features, dim=2).reshape(b, n * len(features), d)
        if self._side:
            features = [
                f if f.shape[1] == self.num_tokens else _resize_grid(f, self._side)
                for f in features
            ]
        return torch.cat(features, dim=-1)
