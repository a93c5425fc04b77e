"""How many tokens each ``<image>`` placeholder takes, and the features that fill them.

With ``model.vision.anyres`` or ``model.vision.video`` set, a placeholder's token count
depends on what it stands for (:class:`Visual`). :meth:`VisualLayout.count` is the one count
function: the data side expands ``<image>`` with it before the model runs, and
:func:`arrange` builds exactly that many features from the tower's tiles. Conventions
(LLaVA-OneVision's):

- ``single`` (a sample's only image): with AnyRes, the base view's ``unit^2`` tokens, then the
  stitched crop map row by row, each row ending in the newline (``lmm.visual.anyres``); without
  AnyRes, ``unit^2`` tokens of one view.
- ``multi`` (one of several images of a sample): one base view, ``unit^2`` tokens, plus one
  newline when AnyRes is on (as OneVision's multi-image path).
- ``video``: every frame's grid pooled to ``ceil(unit / pool)^2``, frames in order, then one
  newline (``lmm.visual.video``).

The newline is a learned vector of the LM's width (``connector.image_newline``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from lmm.errors import ConfigError
from lmm.visual.anyres import AnyResConfig, anyres_map, anyres_tokens
from lmm.visual.video import VideoConfig, pooled_side, video_tokens

VISUAL_KINDS: tuple[str, ...] = ("single", "multi", "video")


class Visual(NamedTuple):
    """What one ``<image>`` placeholder stands for, as far as its tokens go.

    Attributes:
        kind: ``single``, ``multi`` or ``video`` (see the module docstring).
        width: Original width in pixels (a video's first frame).
        height: Original height in pixels.
        frames: Frames of a video (1 for an image).
    """

    kind: str
    width: int
    height: int
    frames: int = 1


@dataclass(frozen=True)
class VisualLayout:
    """Tiles (tower inputs) and tokens per :class:`Visual`, shared by the data side (through
    ``Processor.layout``) and the model.

    Attributes:
        tile: Side of the tower's square input in pixels.
        unit: Side of one tile's token grid after the connector.
        anyres: AnyRes settings for single images (None: one view per image).
        video: Video settings (None: video samples are refused).
    """

    tile: int
    unit: int
    anyres: Optional[AnyResConfig] = None
    video: Optional[VideoConfig] = None

    def _check(self, v: Visual) -> None:
        if v.kind not in VISUAL_KINDS:
            raise ValueError(f"unknown visual kind {v.kind!r}; known: {', '.join(VISUAL_KINDS)}")
        if v.kind == "video" and self.video is None:
            raise ValueError(
                "a video sample needs model.vision.video (frame cap and pooling); it is not set"
            )

    def tiles(self, v: Visual) -> int:
        """Tower inputs of ``v``: AnyRes: the base view, then the crops row-major; video: frames."""
        self._check(v)
        if v.kind == "video":
            return v.frames
        if v.kind == "single" and self.anyres is not None:
            rows, cols = anyres_map(v.width, v.height, self.unit, self.tile, self.anyres).grid
            return 1 + rows * cols
        return 1

    def count(self, v: Visual) -> int:
        """Tokens ``v`` takes in the sequence: what ``<image>`` expands to."""
        self._check(v)
        if v.kind == "video":
            return video_tokens(v.frames, self.unit, self.video.pool)
        if self.anyres is None:
            return self.unit * self.unit
        if v.kind == "multi":
            return self.unit * self.unit + 1
        return anyres_tokens(v.width, v.height, self.unit, self.tile, self.anyres)


def build_layout(
    anyres: Optional[AnyResConfig],
    video: Optional[VideoConfig],
    tile: int,
    connector_tokens: int,
    connector_name: str,
    learned_queries: bool = False,
) -> Optional[VisualLayout]:
    """The layout for these settings, or None when neither is set (every image: a fixed count).
    ``learned_queries``: the connector's tokens are query outputs (resamplers), not a grid."""
    if anyres is None and video is None:
        return None
    unit = math.isqrt(connector_tokens)
    if learned_queries or unit * unit != connector_tokens:
        raise ConfigError(
            f"model.vision.anyres / model.vision.video need a connector whose tokens form a square patch grid "
            f"(to stitch crops and pool frames); connector {connector_name!r} gives {connector_tokens} tokens"
            + (" from learned queries with no 2-D layout" if learned_queries else "")
        )
    return VisualLayout(tile=tile, unit=unit, anyres=anyres, video=video)


def _newline_rows(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """``[h, w, D]`` -> ``[h * (w + 1), D]``: each row followed by the newline."""
    h, _, d = grid.shape
    return torch.cat([grid, newline.expand(h, 1, d)], dim=1).reshape(-1, d)


def _resize(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[..., h, w, D]`` grids (OneVision's interpolation, corners not aligned)."""
    if tuple(grid.shape[-3:-1]) == tuple(size):
        return grid
    x = grid.movedim(-1, -3)
    lead = x.shape[:-3]
    x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear", align_corners=False)
    return x.reshape(*lead, *x.shape[-3:]).movedim(-3, -1)


def _arrange_one(
    tiles: torch.Tensor, v: Visual, layout: VisualLayout, newline: torch.Tensor
) -> torch.Tensor:
    u, d = layout.unit, tiles.shape[-1]
    if v.kind == "video":
        side = pooled_side(u, layout.video.pool)
        frames = _resize(tiles.reshape(-1, u, u, d), (side, side))
        return torch.cat([frames.reshape(-1, d), newline[None]])
    if layout.anyres is None:
        return tiles[0]
    if v.kind == "multi":
        return torch.cat([tiles[0], newline[None]])
    m = anyres_map(v.width, v.height, u, layout.tile, layout.anyres)
    rows, cols = m.grid
    top, bottom, left, right = m.bounds
    # [rows*cols, u*u, D] crops (row-major) -> one [rows*u, cols*u, D] map.
    stitched = (
        tiles[1:].reshape(rows, cols, u, u, d).permute(0, 2, 1, 3, 4).reshape(rows * u, cols * u, d)
    )
    grid = _resize(stitched[top:bottom, left:right], m.size)
    return torch.cat([tiles[0], _newline_rows(grid, newline)])


def arrange(
    features: torch.Tensor, visuals: list[Visual], layout: VisualLayout, newline: torch.Tensor
) -> torch.Tensor:
    """Connector outputs of all tiles ``[tiles, unit^2, D]`` -> the tokens of ``visuals`` in
    order, ``[sum(layout.count(v)), D]``. Loops over items; the merge into the sequence stays
    one ``masked_scatter``."""
    newline = newline.to(features.dtype)
    out, start = [], 0
    for v in visuals:
        n = layout.tiles(v)
        out.append(_arrange_one(features[start : start + n], v, layout, newline))
        start += n
    if start != features.shape[0]:
        raise ValueError(f"{features.shape[0]} tiles given but the images' layout takes {start}")
    return torch.cat(out) if out else features.new_zeros(0, features.shape[-1])
