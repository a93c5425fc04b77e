"""Where objects go and how an image is drawn: every image from its own seeded random stream."""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from lmm.worlds.shapes.config import PALETTE, WorldConfig, WorldObject


def image_rng(cfg: WorldConfig, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """Random stream of image ``index`` of ``split``; ``stream`` 0 = layout, 1 = texts,
    2 = the reference caption of a ``test/caption`` sample.

    crc32 (not ``hash``) keeps the split id stable across Python processes.
    """
    seq = np.random.SeedSequence([cfg.seed, zlib.crc32(split.encode("utf-8")), index, stream])
    return np.random.default_rng(seq)


def sample_objects(cfg: WorldConfig, rng: np.random.Generator) -> list[WorldObject]:
    """Draw the objects of one image, sorted in row-major cell order."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    probs, partners = cfg.shape_probs(), cfg.partners()
    kinds: list[str] = []
    while len(kinds) < n:
        kind = cfg.shapes[int(rng.choice(len(cfg.shapes), p=probs))]
        kinds.append(kind)
        # Co-occurrence structure, so that POPE's adversarial negatives are meaningful.
        mate = partners.get(kind)
        if (
            mate is not None
            and mate not in kinds
            and len(kinds) < n
            and rng.random() < cfg.partner_prob
        ):
            kinds.append(mate)
    return place_objects(cfg, kinds, rng)


def place_objects(
    cfg: WorldConfig, kinds: Sequence[str], rng: np.random.Generator
) -> list[WorldObject]:
    """Put objects of ``kinds`` in distinct random cells, with random colours, sizes and
    jitter; sorted in row-major cell order."""
    n = len(kinds)
    cells = rng.choice(
        cfg.grid * cfg.grid, size=n, replace=False
    )  # random cells => random kind->cell map
    colors = rng.integers(len(cfg.colors), size=n)
    fracs = rng.uniform(cfg.size_range[0], cfg.size_range[1], size=n)
    offsets = rng.uniform(-0.5, 0.5, size=(n, 2))
    cell_px = cfg.image_size / cfg.grid
    objects = []
    for kind, cell, color, frac, (ox, oy) in zip(kinds, cells, colors, fracs, offsets):
        size = float(frac * cell_px)
        slack = cell_px - size  # the offset never pushes the shape out of its cell
        row, col = divmod(int(cell), cfg.grid)
        cx = (col + 0.5) * cell_px + float(ox) * slack
        cy = (row + 0.5) * cell_px + float(oy) * slack
        objects.append(WorldObject(kind, cfg.colors[int(color)], int(cell), cx, cy, size))
    return sorted(objects, key=lambda o: o.cell)


def _star(inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    """Unit five-pointed star, alternating outer (1) and inner radius vertices, tip up."""
    angles = [-np.pi / 2 + i * np.pi / 5 for i in range(10)]
    radii = [1.0 if i % 2 == 0 else inner for i in range(10)]
    return tuple((r * float(np.cos(a)), r * float(np.sin(a))) for r, a in zip(radii, angles))


_ARM = 0.3  # half-width of the cross arms
# Polygon vertices in units of the half-side r, centred on the object centre.  The
# proportions give all kinds a similar visual mass (a full-size square would dominate).
_UNIT_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": ((0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)),
    "diamond": ((0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)),
    "cross": (
        (-_ARM, -1.0),
        (_ARM, -1.0),
        (_ARM, -_ARM),
        (1.0, -_ARM),
        (1.0, _ARM),
        (_ARM, _ARM),
        (_ARM, 1.0),
        (-_ARM, 1.0),
        (-_ARM, _ARM),
        (-1.0, _ARM),
        (-1.0, -_ARM),
        (-_ARM, -_ARM),
    ),  # fmt: skip
    "star": _star(),
}


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple[int, int, int]
) -> None:
    """Fill ``shape`` centred on (x, y) inside a box of half-side r."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x + ux * r, y + uy * r) for ux, uy in _UNIT_POLYGONS[shape]], fill=fill)


def render(cfg: WorldConfig, objects: Sequence[WorldObject]) -> Image.Image:
    """Draw ``objects`` as solid shapes on the plain background."""
    s = cfg.supersample
    img = Image.new("RGB", (cfg.image_size * s, cfg.image_size * s), cfg.background)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw_shape(draw, obj.shape, obj.cx * s, obj.cy * s, obj.size * s / 2, PALETTE[obj.color])
    if s > 1:  # BOX = exact area average: anti-aliasing without ringing/colour overshoot
        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BOX)
    return img


def make_image(cfg: WorldConfig, rng: np.random.Generator) -> tuple[Image.Image, list[WorldObject]]:
    """Sample one image's objects from ``rng`` and render them (handy in notebooks)."""
    objects = sample_objects(cfg, rng)
    return render(cfg, objects), objects


def png_bytes(img: Image.Image) -> bytes:
    """Encode as PNG (deterministic for a given zlib)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
