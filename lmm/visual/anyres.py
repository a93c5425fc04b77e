"""AnyRes (LLaVA-NeXT, LLaVA-OneVision): geometry and token count of one high-resolution image.

An image of any size is shown to the tower as a base view (the whole image at the tower's
input size) plus a grid of ``rows x cols`` crops of that size:

1. the grid is the candidate whose canvas (``cols*tile x rows*tile`` px) keeps the most of the
   image's resolution (the image scaled to fit the canvas, its area capped at the original
   area), ties broken by the least wasted canvas area, then by candidate order;
2. the image is resized into the canvas keeping its aspect ratio and centred on padding
   (black, as LLaVA-NeXT and transformers pad it), then cut into crops, row-major;
3. the crops' feature grids (``unit x unit`` each) are stitched into one
   ``rows*unit x cols*unit`` map, and the rows/columns that only saw padding are removed;
4. OneVision's budget (``anyres_max_N``): a map of more than ``max_tiles`` crops' worth of
   tokens is shrunk by bilinear interpolation;
5. a learned newline embedding ends every row. The LM reads the base view's tokens first,
   then the map row by row.

Everything here is geometry without torch: the data side calls it to expand ``<image>`` and
the model to arrange features, so both agree by construction. The grid choice and the resized
size are computed in Python floats exactly as LLaVA-NeXT's ``select_best_resolution`` /
``resize_and_pad_image`` and transformers' ``select_best_resolution`` /
``get_patch_output_size`` do: a product such as ``2725 * (2016 / 2725)`` can land just below an
integer and truncate, and the references' crops depend on it (2725x1817 at 336 px: a 4x6 grid,
where exact fractions would pick 5x6). The unpadding is exact integer arithmetic, equal to
transformers' ``round(x, 7)`` (the unpadded map keeps ``current - 2*padding`` rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

from lmm.errors import ConfigError
from lmm.visual.image_spec import PREPROCESS_MODES

Grid = tuple[int, int]  # (rows, cols)


@dataclass
class AnyResConfig:
    """AnyRes views of single images (LLaVA-OneVision's ``anyres_max_9`` with up to 6x6 crops).

    Args:
        max_grid: Candidate grids are every ``rows x cols`` with ``1 <= rows, cols <= max_grid``
            (OneVision: 6, i.e. 36 shapes up to 2304 x 2304 px at 384 px crops).
        grids: Explicit candidate grids ``[[rows, cols], ...]`` instead of ``max_grid``
            (LLaVA-NeXT 1.6: ``[[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]]``).
        max_tiles: Token budget of the stitched map in crops: a map holding more than
            ``max_tiles x unit^2`` tokens is shrunk bilinearly by ``sqrt(tokens / budget)``
            per side. None: never shrink (LLaVA-NeXT).
        shrink_tolerance: Shrink only when that factor exceeds this value (OneVision: 1.1),
            so a map just over the budget keeps its resolution.
        crop_fill: The canvas around the resized image before it is cut into crops: ``black``
            (LLaVA-NeXT's ``resize_and_pad_image``, transformers' ``LlavaOnevisionImageProcessor``)
            or ``mean`` (the tower's mean colour, ``model.vision.fill_rounding``: the padding
            normalises to about zero, "no content").
        multi_image_preprocess: How each image of a several-image sample becomes its one view
            (``model.vision.image_preprocess`` modes): ``pad`` (OneVision's training pads them
            to a square, ``expand2square``, as transformers' processor does). None: as the
            single images' base view (``model.vision.image_preprocess``).
    """

    max_grid: int = 6
    grids: Optional[list[tuple[int, int]]] = None
    max_tiles: Optional[int] = 9
    shrink_tolerance: float = 1.1
    crop_fill: Literal["black", "mean"] = "black"
    multi_image_preprocess: Optional[str] = "pad"

    def __post_init__(self) -> None:
        if self.grids is not None:
            # JSON and YAML give lists; grids are compared and hashed as tuples.
            self.grids = [tuple(int(x) for x in g) for g in self.grids]
        if self.max_grid < 1:
            raise ConfigError(f"model.vision.anyres.max_grid must be >= 1, got {self.max_grid}")
        if self.grids is not None and (
            not self.grids or any(len(g) != 2 or min(g) < 1 for g in self.grids)
        ):
            raise ConfigError(
                f"model.vision.anyres.grids: need [rows, cols] pairs of positive ints, got {self.grids}"
            )
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError(
                f"model.vision.anyres.max_tiles must be >= 1 or null, got {self.max_tiles}"
            )
        if self.shrink_tolerance < 1:
            raise ConfigError(
                f"model.vision.anyres.shrink_tolerance must be >= 1, got {self.shrink_tolerance}"
            )
        if self.crop_fill not in ("black", "mean"):
            raise ConfigError(
                f"model.vision.anyres.crop_fill: unknown value {self.crop_fill!r}; allowed: black, mean"
            )
        if (
            self.multi_image_preprocess is not None
            and self.multi_image_preprocess not in PREPROCESS_MODES
        ):
            raise ConfigError(
                f"model.vision.anyres.multi_image_preprocess: unknown mode {self.multi_image_preprocess!r}; "
                f"allowed: {', '.join(PREPROCESS_MODES)} or null"
            )

    def candidates(self) -> list[Grid]:
        """Candidate grids in the order ties are broken."""
        if self.grids is not None:
            return list(self.grids)
        return [(r, c) for r in range(1, self.max_grid + 1) for c in range(1, self.max_grid + 1)]


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def select_grid(width: int, height: int, candidates: list[Grid], tile: int) -> Grid:
    """The candidate grid that keeps the most of a ``width x height`` image's resolution
    (in floats, truncating, as the references: see the module docstring)."""
    _check_size(width, height)
    best, best_effective, best_waste = None, -1, 0
    for rows, cols in candidates:
        canvas_w, canvas_h = cols * tile, rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (rows, cols), effective, waste
    if best is None:
        raise ConfigError("model.vision.anyres: no candidate grid")
    return best


def fit_in_canvas(
    width: int, height: int, canvas_w: int, canvas_h: int
) -> tuple[int, int, int, int]:
    """``(new_w, new_h, left, top)``: the image resized into the canvas keeping its aspect
    ratio (the fitting side fills the canvas, the other is the float product rounded up, as
    the references), pasted centred (the extra row/column at the bottom/right)."""
    _check_size(width, height)
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        new_w, new_h = canvas_w, min(math.ceil(height * scale_w), canvas_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), canvas_w), canvas_h
    return new_w, new_h, (canvas_w - new_w) // 2, (canvas_h - new_h) // 2


def unpad_bounds(width: int, height: int, map_h: int, map_w: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the feature map's rows/columns that hold the image
    (LLaVA-NeXT's ``unpad_image``, in exact integer arithmetic)."""
    _check_size(width, height)
    if width * map_h > map_w * height:  # wider than the map: padding above and below
        pad = (map_h - height * map_w // width) // 2
        return pad, map_h - pad, 0, map_w
    pad = (map_w - width * map_h // height) // 2
    return 0, map_h, pad, map_w - pad


def shrink_size(h: int, w: int, unit: int, cfg: AnyResConfig) -> tuple[int, int]:
    """The map's size after OneVision's budget rule (unchanged when within budget)."""
    if cfg.max_tiles is None:
        return h, w
    factor = math.sqrt(h * w / (cfg.max_tiles * unit * unit))
    if factor <= cfg.shrink_tolerance:
        return h, w
    return int(h // factor), int(w // factor)


class AnyResMap(NamedTuple):
    """Where an image's crop features go: the grid, the rows/columns of the stitched map that
    hold the image, and the map's final size."""

    grid: Grid
    bounds: tuple[int, int, int, int]  # (top, bottom, left, right) of the unpadded map
    size: tuple[int, int]  # (h, w) after the budget rule, before newlines


def anyres_map(width: int, height: int, unit: int, tile: int, cfg: AnyResConfig) -> AnyResMap:
    """The grid, unpadding and budget of one ``width x height`` image."""
    rows, cols = select_grid(width, height, cfg.candidates(), tile)
    top, bottom, left, right = unpad_bounds(width, height, rows * unit, cols * unit)
    return AnyResMap(
        (rows, cols), (top, bottom, left, right), shrink_size(bottom - top, right - left, unit, cfg)
    )


def anyres_tokens(width: int, height: int, unit: int, tile: int, cfg: AnyResConfig) -> int:
    """Tokens of one AnyRes image: the base view's ``unit^2``, then ``h`` rows of ``w``
    features plus a newline."""
    h, w = anyres_map(width, height, unit, tile, cfg).size
    return unit * unit + h * (w + 1)
