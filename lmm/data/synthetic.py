"""Deterministic synthetic "shapes world" and its WebDataset shard writer.

The world is a tiny, fully controlled stand-in for natural image/text data: small
RGB images holding 1-4 coloured shapes on a 3x3 grid, with captions, multi-turn
QA conversations and POPE-style object-probing questions that are exactly correct
by construction.  Everything is a pure function of ``(WorldConfig, seed)``:

* every image has its own random stream, seeded from ``(seed, split, index)``
  through :class:`numpy.random.SeedSequence` (never Python's salted ``hash``), so
  splits are independent, held out from each other and stable across runs;
* the layout (objects) and the texts use two separate sub-streams, so changing a
  text option (e.g. ``describe_prob``) does not change any image;
* shards are written with a fixed tar mtime, so the same config gives
  byte-identical ``.tar`` files.

Public entry points: :class:`WorldConfig`, :func:`make_image`,
:func:`sample_objects`, :func:`render`, :func:`make_caption`,
:func:`make_conversation`, :func:`short_answer_questions`, :func:`pope_questions`,
:func:`compute_stats`, :func:`write_world` and :func:`world_corpus`.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Bump when the on-disk format or the generator changes, so that write_world
# regenerates instead of silently reusing an outdated world.
FORMAT_VERSION = 4

Turn = tuple[str, str, str]
"""A single QA turn: ``(question, answer, category)``."""

# Clearly distinct, saturated colours that all stand out on the dark background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 210),
    "white": (245, 245, 245),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "pink": (250, 130, 190),
}

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")

# Row-major names of the 3x3 cells; used both as answers and in captions.
POSITIONS_3X3: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

CAPTION_TEMPLATES: tuple[str, ...] = ("{objects}.", "in the image: {objects}.", "the image has {objects}.")
CAPTION_STYLES: tuple[str, ...] = ("objects", "grid", "kinds")
PRETRAIN_PROMPT = "Describe the image briefly."
DESCRIBE_QUESTION = "Describe the image."
IMAGE_TOKEN = "<image>"
SHORT_ANSWER_CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "position")
CONVERSATION_CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "position", "exist")
POPE_STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")

# Tar members get this fixed mtime; TarWriter would otherwise stamp time.time(). An int:
# a float mtime makes tarfile write a 1 KiB PAX record before every member.
_TAR_MTIME = 0


def position_names(grid: int) -> tuple[str, ...]:
    """Return the row-major cell names for a ``grid`` x ``grid`` layout (only 3 is supported)."""
    if grid != 3:
        raise ValueError(f"only a 3x3 grid has named positions, got grid={grid}")
    return POSITIONS_3X3


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the generated world (the output is a pure function of it)."""

    image_size: int = 48
    """Side of the square RGB images in pixels."""
    grid: int = 3
    """Cells per side; objects sit in distinct cells (only 3 has position names)."""
    shapes: tuple[str, ...] = SHAPE_KINDS
    """Shape kinds, most frequent first (see ``shape_weights``)."""
    shape_weights: tuple[float, ...] | None = None
    """Relative sampling weight per kind; None = linearly decreasing from 3 to 1."""
    partner_pairs: tuple[tuple[str, str], ...] = (("circle", "square"), ("triangle", "diamond"), ("cross", "star"))
    """Kinds that co-occur: drawing one adds the other with ``partner_prob`` (if room remains)."""
    partner_prob: float = 0.5
    """Probability that a drawn kind brings its partner along."""
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
    """Colour names (keys of ``PALETTE``), sampled uniformly."""
    background: tuple[int, int, int] = (45, 45, 45)
    """Background RGB (plain dark grey)."""
    min_objects: int = 1
    """Minimum number of objects per image."""
    max_objects: int = 4
    """Maximum number of objects per image (at most grid*grid)."""
    size_range: tuple[float, float] = (0.6, 0.85)
    """Object size as a fraction of the cell size, drawn uniformly per object."""
    supersample: int = 4
    """Draw at this many times the resolution and box-downsample, for clean anti-aliased edges."""
    train_images: int = 12000
    """Number of training images (each gives one pretrain and one finetune sample)."""
    val_images: int = 200
    """Number of validation images."""
    test_images: int = 300
    """Number of held-out test images (POPE and short-answer)."""
    samples_per_shard: int = 2000
    """Maximum samples per shard for the pretrain/finetune splits."""
    eval_samples_per_shard: int = 1000
    """Maximum samples per shard for the val/test splits."""
    min_turns: int = 2
    """Minimum QA turns in a finetune conversation."""
    max_turns: int = 4
    """Maximum QA turns in a finetune conversation."""
    describe_prob: float = 0.15
    """Probability that a finetune conversation gets one "Describe the image." turn."""
    category_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    """Relative chance of each question category per turn, in ``CONVERSATION_CATEGORIES``
    order (color, shape, count, position, exist); a category impossible for an image falls
    through to the next draw."""
    short_questions_per_image: int = 2
    """Short-answer (color/shape/count/position) questions per val/test image."""
    val_pope_pairs_per_image: int = 1
    """POPE-random (yes, no) question pairs per val image."""
    pope_positives: int = 3
    """POPE positives per test image (fewer if the image has fewer kinds, or fewer absent ones)."""
    image_after_question: bool = False
    """Write the first human turn as ``question\n<image>`` instead of ``<image>\nquestion``
    (LLaVA's instruction data uses both orders). With the question first, every image token
    can attend to it, so a tiny LM can mark the matching object inside the image span
    instead of searching the image from the question."""
    balanced_exist: bool = False
    """Ask existence questions in Yes/No pairs per image (as POPE balances each image), the
    kinds drawn inversely to how often they are present (Yes) or absent (No), so that neither
    the kind nor the image alone predicts the answer (other categories fill the remaining
    turns). With a coin per question, rare kinds are mostly asked while absent: a prior a
    model can answer from. (An earlier per-kind scheme balanced the kinds but asked crowded
    images mostly "Yes".)"""
    turns_per_sample: int = 0
    """Split each finetune conversation into samples of at most this many turns, each with its
    own copy of the image (its first question placed by ``image_after_question``); 0 keeps one
    conversation per image. Single-turn samples put every question where the test puts it
    (before the image when ``image_after_question``), so the image tokens can attend to it."""
    caption_style: str = "objects"
    """``objects``: captions list the objects in row-major order ("at the top left a red
    circle and ..."), with one of a few openers. ``grid``: captions name every cell in
    row-major order, vacant ones included ("top left: red circle, top: empty, ...").
    ``kinds``: the objects grouped by shape kind in ``shapes`` order ("circle: red at the top
    left. square: blue in the center, green on the right."), so a caption also supervises
    which kinds are present and finding an object by its kind, what existence, colour and
    position questions ask."""
    seed: int = 0
    """Root seed of all random streams."""

    def __post_init__(self) -> None:
        position_names(self.grid)
        unknown = [c for c in self.colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; known: {sorted(PALETTE)}")
        unknown = [s for s in self.shapes if s not in DRAWABLE_SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; known: {sorted(DRAWABLE_SHAPES)}")
        if len(set(self.shapes)) != len(self.shapes) or len(set(self.colors)) != len(self.colors):
            raise ValueError("shapes and colors must not contain duplicates")
        if self.shape_weights is not None and len(self.shape_weights) != len(self.shapes):
            raise ValueError("shape_weights must have one weight per shape")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError("need 1 <= min_objects <= max_objects <= grid*grid")
        if not 0.0 < self.size_range[0] <= self.size_range[1] <= 1.0:
            raise ValueError("size_range must satisfy 0 < low <= high <= 1")
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(f"unknown caption_style {self.caption_style!r}; choose one of {list(CAPTION_STYLES)}")
        if len(self.category_weights) != len(CONVERSATION_CATEGORIES) or min(self.category_weights) < 0 \
                or sum(self.category_weights) <= 0:
            raise ValueError(f"category_weights needs {len(CONVERSATION_CATEGORIES)} non-negative weights "
                             f"({', '.join(CONVERSATION_CATEGORIES)}), not all zero")
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError("need 1 <= min_turns <= max_turns")
        if self.turns_per_sample < 0:
            raise ValueError("turns_per_sample must be >= 0 (0 = one conversation per image)")
        if self.samples_per_shard < 1 or self.eval_samples_per_shard < 1:
            raise ValueError("samples per shard must be positive")
        paired = [s for pair in self.partner_pairs for s in pair]
        if len(set(paired)) != len(paired) or any(s not in self.shapes for s in paired):
            raise ValueError("partner_pairs must use known shapes, each in at most one pair")

    def shape_probs(self) -> np.ndarray:
        """Normalised sampling probabilities of the shape kinds."""
        weights = self.shape_weights
        if weights is None:  # most frequent kind ~3x the rarest
            weights = tuple(np.linspace(3.0, 1.0, len(self.shapes)))
        probs = np.asarray(weights, dtype=np.float64)
        return probs / probs.sum()

    def partners(self) -> dict[str, str]:
        """Symmetric kind -> partner-kind mapping."""
        out: dict[str, str] = {}
        for a, b in self.partner_pairs:
            out[a], out[b] = b, a
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (tuples become lists), as stored in the manifest."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldConfig:
        """Inverse of :meth:`to_dict` (lists become tuples again)."""

        def tup(v: Any) -> Any:
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        names = {f.name for f in fields(cls)}
        return cls(**{k: tup(v) for k, v in data.items() if k in names})


@dataclass(frozen=True)
class WorldObject:
    """One drawn object: kind, colour, grid cell and its jittered geometry (pixels)."""

    shape: str
    color: str
    cell: int
    cx: float
    cy: float
    size: float

    def to_json(self, grid: int = 3) -> dict[str, Any]:
        """Compact JSON record stored with each sample (``bbox`` is x0, y0, x1, y1)."""
        h = self.size / 2
        return {
            "shape": self.shape,
            "color": self.color,
            "cell": self.cell,
            "position": position_names(grid)[self.cell],
            "bbox": [round(v, 3) for v in (self.cx - h, self.cy - h, self.cx + h, self.cy + h)],
        }


# --------------------------------------------------------------------------- layout + rendering


def image_rng(cfg: WorldConfig, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """Random stream of image ``index`` of ``split``; ``stream`` 0 = layout, 1 = texts.

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
        if mate is not None and mate not in kinds and len(kinds) < n and rng.random() < cfg.partner_prob:
            kinds.append(mate)
    return place_objects(cfg, kinds, rng)


def place_objects(cfg: WorldConfig, kinds: Sequence[str], rng: np.random.Generator) -> list[WorldObject]:
    """Put objects of ``kinds`` in distinct random cells, with random colours, sizes and
    jitter; sorted in row-major cell order."""
    n = len(kinds)
    cells = rng.choice(cfg.grid * cfg.grid, size=n, replace=False)  # random cells => random kind->cell map
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
        (-_ARM, -1.0), (_ARM, -1.0), (_ARM, -_ARM), (1.0, -_ARM), (1.0, _ARM), (_ARM, _ARM),
        (_ARM, 1.0), (-_ARM, 1.0), (-_ARM, _ARM), (-1.0, _ARM), (-1.0, -_ARM), (-_ARM, -_ARM),
    ),  # fmt: skip
    "star": _star(),
}
DRAWABLE_SHAPES: frozenset[str] = frozenset({"circle", *_UNIT_POLYGONS})


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


# --------------------------------------------------------------------------- texts


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def position_phrase(position: str) -> str:
    """Natural prepositional phrase for a cell name: "in the center", "on the left", "at the top"..."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def object_phrase(shape: str, color: str, position: str) -> str:
    """Caption fragment such as "at the top left a red circle".

    The position comes first: a caption then supervises "what is in this cell" token by
    token, a direct look-up the tiny model learns early; with the position last it must
    first find the next occupied cell, and shape features barely learned from captions.
    """
    return f"{position_phrase(position)} {_article(color)} {color} {shape}"


def cell_phrase(position: str, shape: str | None = None, color: str | None = None) -> str:
    """Grid-caption fragment such as "top left: red circle" or "top: empty"."""
    return f"{position}: {color} {shape}" if shape else f"{position}: empty"


def kind_phrase(shape: str, members: Sequence[tuple[str, str]]) -> str:
    """Kinds-caption fragment such as "square: blue in the center, green at the bottom right"
    (``members``: the kind's (colour, cell name) pairs)."""
    return f"{shape}: " + ", ".join(f"{color} {position_phrase(position)}" for color, position in members)


def make_caption(cfg: WorldConfig, objects: Sequence[WorldObject], rng: np.random.Generator) -> str:
    """Caption in ``cfg.caption_style``: every object in row-major order with one of a few
    fixed templates, every cell in row-major order, or the objects grouped by kind."""
    names = position_names(cfg.grid)
    if cfg.caption_style == "grid":
        by_cell = {o.cell: o for o in objects}
        cells = [by_cell.get(c) for c in range(len(names))]
        return ", ".join(cell_phrase(n, o and o.shape, o and o.color) for n, o in zip(names, cells)) + "."
    if cfg.caption_style == "kinds":
        ordered = sorted(objects, key=lambda o: o.cell)
        groups = [[(o.color, names[o.cell]) for o in ordered if o.shape == kind] for kind in cfg.shapes]
        return ". ".join(kind_phrase(kind, members) for kind, members in zip(cfg.shapes, groups) if members) + "."
    parts = [object_phrase(o.shape, o.color, names[o.cell]) for o in sorted(objects, key=lambda o: o.cell)]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(objects=listing)


def color_question(shape: str) -> str:
    """Question of category ``color``."""
    return f"What color is the {shape}?"


def shape_question(color: str) -> str:
    """Question of category ``shape``."""
    return f"What shape is the {color} object?"


def count_all_question() -> str:
    """Question of category ``count`` (all objects)."""
    return "How many objects are there?"


def count_shape_question(shape: str) -> str:
    """Question of category ``count`` (one kind; the answer may be 0)."""
    return f"How many {_plural(shape)} are there?"


def position_question(color: str, shape: str) -> str:
    """Question of category ``position``."""
    return f"Where is the {color} {shape}?"


def exist_question(shape: str) -> str:
    """Yes/no existence question (category ``exist``, and POPE)."""
    return f"Is there {_article(shape)} {shape} in the image?"


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def ask(
    cfg: WorldConfig, category: str, objects: Sequence[WorldObject], rng: np.random.Generator, used: set[str]
) -> Turn | None:
    """Draw one question of ``category`` about ``objects`` that is not in ``used``.

    Returns ``(question, answer, category)`` or None when the category has no valid,
    unused question for this image (e.g. ``color`` needs a shape that occurs once).
    """
    shape_n = {s: sum(o.shape == s for o in objects) for s in cfg.shapes}
    color_n = {c: sum(o.color == c for o in objects) for c in cfg.colors}
    if category == "color":  # only unambiguous when the shape occurs once
        options = [(color_question(o.shape), o.color) for o in objects if shape_n[o.shape] == 1]
    elif category == "shape":
        options = [(shape_question(o.color), o.shape) for o in objects if color_n[o.color] == 1]
    elif category == "position":
        pair_n = {(o.color, o.shape): 0 for o in objects}
        for o in objects:
            pair_n[(o.color, o.shape)] += 1
        names = position_names(cfg.grid)
        options = [
            (position_question(o.color, o.shape), names[o.cell]) for o in objects if pair_n[(o.color, o.shape)] == 1
        ]
    elif category == "count":
        # Half total counts, half per-kind counts (which may be 0), if still unused.
        total = [(count_all_question(), str(len(objects)))]
        per_kind = [(count_shape_question(s), str(n)) for s, n in shape_n.items()]
        total = [qa for qa in total if qa[0] not in used]
        per_kind = [qa for qa in per_kind if qa[0] not in used]
        options = total if total and (not per_kind or rng.random() < 0.5) else per_kind
    elif category == "exist":
        # A fair coin picks yes/no.  Capping the exist questions per image at
        # min(#present kinds, #absent kinds) guarantees the drawn side still has an unused
        # kind, so the coin is never overridden (which would bias towards "No").
        asked = sum(exist_question(s) in used for s in cfg.shapes)
        n_present = sum(n > 0 for n in shape_n.values())
        if asked >= min(n_present, len(cfg.shapes) - n_present):
            return None
        want_yes = bool(rng.random() < 0.5)
        pool = [s for s in cfg.shapes if (shape_n[s] > 0) == want_yes]  # negatives: uniform over absent
        options = [(exist_question(s), "Yes" if want_yes else "No") for s in pool]
    else:
        raise ValueError(f"unknown question category {category!r}")
    options = [qa for qa in options if qa[0] not in used]
    if not options:
        return None
    question, answer = _pick(rng, options)
    return question, answer, category


@lru_cache(maxsize=8)
def kind_presence(cfg: WorldConfig, n_images: int = 5000) -> dict[str, float]:
    """P(kind occurs in an image) per kind, estimated on ``n_images`` layouts of a fixed random
    stream, so every worker process gets the same values."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, zlib.crc32(b"kind_presence")]))
    counts = dict.fromkeys(cfg.shapes, 0)
    for _ in range(n_images):
        for shape in {o.shape for o in sample_objects(cfg, rng)}:
            counts[shape] += 1
    return {s: n / n_images for s, n in counts.items()}


def balanced_exist_turns(cfg: WorldConfig, objects: Sequence[WorldObject], rng: np.random.Generator) -> list[Turn]:
    """Existence questions in Yes/No pairs (``balanced_exist``): min(2, kinds present) pairs per
    image; the Yes kinds drawn from the present kinds with weight P(kind present)^-3, the No
    kinds from the absent ones with weight P(kind absent)^-3. The cube (found by simulation)
    brings every kind's Yes share within a few points of one half; with plain inverse
    weights the rarest kind stays near 0.4."""
    presence = kind_presence(cfg)
    present = sorted({o.shape for o in objects}, key=cfg.shapes.index)
    absent = [k for k in cfg.shapes if k not in present]
    n = min(2, len(present), len(absent))

    def draw(kinds: list[str], weights: list[float]) -> list[str]:
        w = np.asarray(weights) / np.sum(weights)
        return [kinds[int(i)] for i in rng.choice(len(kinds), size=n, replace=False, p=w)]

    yes = draw(present, [presence[k] ** -3 for k in present])
    no = draw(absent, [(1 - presence[k]) ** -3 for k in absent])
    return [(exist_question(k), answer, "exist") for pair in zip(yes, no) for k, answer in zip(pair, ("Yes", "No"))]


def _category_order(cfg: WorldConfig, rng: np.random.Generator, exclude_exist: bool = False) -> np.ndarray:
    """Categories in random order, drawn without replacement by ``category_weights``."""
    n = len(CONVERSATION_CATEGORIES)
    weights = np.asarray(cfg.category_weights, dtype=float)
    if exclude_exist:
        weights[CONVERSATION_CATEGORIES.index("exist")] = 0.0
    if np.all(weights == weights[0]):
        return rng.permutation(n)  # uniform: the same stream as before weights existed
    # Zero-weight categories are never asked.
    return rng.choice(n, size=int((weights > 0).sum()), replace=False, p=weights / weights.sum())


def make_conversation(
    cfg: WorldConfig, objects: Sequence[WorldObject], caption: str, rng: np.random.Generator
) -> list[Turn]:
    """``min_turns``-``max_turns`` distinct QA turns of random categories (plus the balanced
    existence questions when ``balanced_exist``), sometimes with one describe turn."""
    n_turns = int(rng.integers(cfg.min_turns, cfg.max_turns + 1))
    describe = bool(rng.random() < cfg.describe_prob)
    exist = balanced_exist_turns(cfg, objects, rng) if cfg.balanced_exist else []
    turns: list[Turn] = []
    used: set[str] = set()
    while len(turns) < max(1, n_turns - int(describe) - len(exist)):
        for idx in _category_order(cfg, rng, exclude_exist=cfg.balanced_exist):  # fall back if impossible
            turn = ask(cfg, CONVERSATION_CATEGORIES[int(idx)], objects, rng, used)
            if turn is not None:
                break
        else:
            break  # every question type exhausted (cannot happen with the defaults)
        turns.append(turn)
        used.add(turn[0])
    for turn in exist:
        turns.insert(int(rng.integers(len(turns) + 1)), turn)
    if describe:
        turns.insert(int(rng.integers(len(turns) + 1)), (DESCRIBE_QUESTION, caption, "describe"))
    return turns


def short_answer_questions(
    cfg: WorldConfig, objects: Sequence[WorldObject], rng: np.random.Generator, index: int, count: int
) -> list[Turn]:
    """``count`` open-ended questions for eval image ``index``.

    Categories rotate with the image index (image i starts at category ``count*i``),
    which balances them across a split without any cross-image state, so images can be
    generated in parallel; an impossible category falls through to the next one.
    """
    cats = SHORT_ANSWER_CATEGORIES
    turns: list[Turn] = []
    used: set[str] = set()
    for step in range(len(cats) * 2):  # two passes so count > len(cats) still works
        if len(turns) == count:
            break
        turn = ask(cfg, cats[(index * count + step) % len(cats)], objects, rng, used)
        if turn is not None:
            turns.append(turn)
            used.add(turn[0])
    return turns


# --------------------------------------------------------------------------- POPE


def compute_stats(cfg: WorldConfig, object_lists: Iterable[Sequence[WorldObject]]) -> dict[str, Any]:
    """Image-level kind frequencies and co-occurrence counts (POPE popular/adversarial).

    ``image_counts[s]`` = number of images containing kind s; ``cooccurrence[a][b]`` =
    number of images containing both a and b (a != b).  write_world counts these over
    the generated train split, as the POPE paper does with the training annotations.
    """
    counts = {s: 0 for s in cfg.shapes}
    cooc = {a: {b: 0 for b in cfg.shapes if b != a} for a in cfg.shapes}
    n_images = 0
    for objects in object_lists:
        n_images += 1
        kinds = {o.shape for o in objects}
        for a in kinds:
            counts[a] += 1
            for b in kinds:
                if b != a:
                    cooc[a][b] += 1
    return {"num_images": n_images, "image_counts": counts, "cooccurrence": cooc}


def pope_negatives(
    cfg: WorldConfig, present: Sequence[str], k: int, strategy: str, stats: dict[str, Any], rng: np.random.Generator
) -> list[str]:
    """``k`` absent kinds chosen by the POPE ``strategy`` (ties broken by ``cfg.shapes`` order)."""
    absent = [s for s in cfg.shapes if s not in present]
    if strategy == "random":
        return [absent[int(i)] for i in rng.choice(len(absent), size=k, replace=False)]
    counts = stats["image_counts"]
    if strategy == "popular":
        key = lambda s: (-counts[s], cfg.shapes.index(s))  # noqa: E731
    elif strategy == "adversarial":
        cooc = stats["cooccurrence"]
        key = lambda s: (-sum(cooc[p][s] for p in present), -counts[s], cfg.shapes.index(s))  # noqa: E731
    else:
        raise ValueError(f"unknown POPE strategy {strategy!r}")
    return sorted(absent, key=key)[:k]


def pope_questions(
    cfg: WorldConfig,
    objects: Sequence[WorldObject],
    stats: dict[str, Any],
    rng: np.random.Generator,
    n_positives: int,
    strategies: Sequence[str] = POPE_STRATEGIES,
) -> dict[str, list[tuple[str, str]]]:
    """POPE ``(question, "yes"|"no")`` lists per strategy for one image.

    All strategies share the same positives (as in POPE) and each has as many negatives
    as positives: k = min(n_positives, #present kinds, #absent kinds).  Questions are
    interleaved yes, no, yes, no, ...
    """
    present = [s for s in cfg.shapes if any(o.shape == s for o in objects)]
    k = min(n_positives, len(present), len(cfg.shapes) - len(present))
    positives = [present[int(i)] for i in rng.choice(len(present), size=k, replace=False)]
    out: dict[str, list[tuple[str, str]]] = {}
    for strategy in strategies:
        negatives = pope_negatives(cfg, present, k, strategy, stats, rng)
        items: list[tuple[str, str]] = []
        for pos, neg in zip(positives, negatives):
            items += [(exist_question(pos), "yes"), (exist_question(neg), "no")]
        out[strategy] = items
    return out


# --------------------------------------------------------------------------- per-image sample builders


def with_image(cfg: WorldConfig, question: str) -> str:
    """The first human turn: the question with the image placeholder before or after it."""
    return f"{question}\n{IMAGE_TOKEN}" if cfg.image_after_question else f"{IMAGE_TOKEN}\n{question}"


def _conversation_json(cfg: WorldConfig, turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA schema; the image placeholder is in the first human turn only."""
    conv: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(turns):
        conv.append({"from": "human", "value": with_image(cfg, question) if i == 0 else question})
        conv.append({"from": "gpt", "value": answer})
    return conv


def _json_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


Sample = tuple[str, str, bytes, bytes]
"""A sample ready to write: ``(output_split, key, png, json_bytes)``."""


def _train_image(cfg: WorldConfig, index: int) -> tuple[list[WorldObject], list[Sample]]:
    """Pretrain + finetune samples of train image ``index`` (runs in worker processes)."""
    objects = sample_objects(cfg, image_rng(cfg, "train", index, 0))
    png = png_bytes(render(cfg, objects))
    text_rng = image_rng(cfg, "train", index, 1)
    caption = make_caption(cfg, objects, text_rng)
    turns = make_conversation(cfg, objects, caption, text_rng)
    key = f"train-{index:06d}"
    objs = [o.to_json(cfg.grid) for o in objects]
    base = {"id": key, "image": f"{key}.png"}
    pretrain = {**base, "conversations": _conversation_json(cfg, [(PRETRAIN_PROMPT, caption)]), "objects": objs}
    samples = [("pretrain", key, png, _json_bytes(pretrain))]
    step = cfg.turns_per_sample or max(1, len(turns))
    for j in range(0, len(turns), step):
        part = turns[j:j + step]
        part_key = f"{key}-t{j:02d}" if cfg.turns_per_sample else key
        finetune = {
            "id": part_key,
            "image": f"{part_key}.png",
            "conversations": _conversation_json(cfg, [(q, a) for q, a, _ in part]),
            "categories": [c for _, _, c in part],
            "objects": objs,
        }
        samples.append(("finetune", part_key, png, _json_bytes(finetune)))
    return objects, samples


def _eval_image(cfg: WorldConfig, split: str, stats: dict[str, Any], index: int) -> list[Sample]:
    """Single-question samples of val/test image ``index`` (``question_id`` is filled in later)."""
    objects = sample_objects(cfg, image_rng(cfg, split, index, 0))
    png = png_bytes(render(cfg, objects))
    text_rng = image_rng(cfg, split, index, 1)
    image_id = f"{split}-{index:06d}"
    objs = [o.to_json(cfg.grid) for o in objects]
    short = short_answer_questions(cfg, objects, text_rng, index, cfg.short_questions_per_image)
    if split == "val":
        pope = pope_questions(cfg, objects, stats, text_rng, cfg.val_pope_pairs_per_image, ("random",))
        groups = {"val": [(q, a, c) for q, a, c in short] + [(q, a, "pope") for q, a in pope["random"]]}
    else:
        pope = pope_questions(cfg, objects, stats, text_rng, cfg.pope_positives)
        groups = {"test/short_answer": list(short)}
        groups.update({f"test/pope_{s}": [(q, a, "pope") for q, a in items] for s, items in pope.items()})
    samples: list[Sample] = []
    for out_split, items in groups.items():
        for j, (question, answer, category) in enumerate(items):
            key = f"{image_id}-q{j:02d}"
            record: dict[str, Any] = {"id": key, "question_id": None, "image_id": image_id, "image": f"{key}.png"}
            if category == "pope":
                record.update(text=question, label=answer)
            record.update(
                conversations=[{"from": "human", "value": with_image(cfg, question)}],
                answer=answer,
                category=category,
                objects=objs,
            )
            samples.append((out_split, key, png, _json_bytes(record)))
    return samples


# --------------------------------------------------------------------------- shard writing


class ShardedTarWriter:
    """Writes ``{key}.png`` + ``{key}.json`` samples (or any members) into ``shard-{k:06d}.tar``
    files of bounded size."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int) -> None:
        self.out_dir, self.split, self.limit = out_dir, split, samples_per_shard
        self.shards: list[str] = []
        self.num_samples = 0
        self._file: Any = None
        self._tar: Any = None

    def write(self, key: str, png: bytes, json_bytes: bytes) -> None:
        """Append one single-image sample, starting a new shard when the current one is full."""
        self.write_members(key, {"png": png, "json": json_bytes})

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample of any members (e.g. ``000.png``, ``001.png``, ``json``)."""
        import webdataset as wds  # imported lazily: only shard writing needs it

        if self._tar is None or self.num_samples % self.limit == 0:
            self._close_current()
            rel = f"{self.split}/shard-{len(self.shards):06d}.tar"
            (self.out_dir / self.split).mkdir(parents=True, exist_ok=True)
            self._file = open(self.out_dir / rel, "wb")
            # Fixed mtime + pre-encoded bytes => byte-identical tars across runs.
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)
            self.shards.append(rel)
        self._tar.write({"__key__": key, **members})
        self.num_samples += 1

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    def close(self) -> None:
        """Finish the last shard."""
        self._close_current()


def _imap(fn: Callable[[int], Any], n: int, pool: Any, workers: int) -> Iterator[Any]:
    """Ordered map over ``range(n)``, in a pool when one is given (order stays deterministic)."""
    if pool is None:
        return map(fn, range(n))
    # Chunks amortise IPC; capped so progress stays smooth and workers stay balanced.
    return pool.imap(fn, range(n), chunksize=max(1, min(64, n // (4 * workers))))


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(manifest: dict[str, Any] | None, cfg: WorldConfig, out_dir: Path) -> bool:
    if not manifest or manifest.get("format_version") != FORMAT_VERSION or manifest.get("config") != cfg.to_dict():
        return False
    return all((out_dir / s).is_file() for split in manifest["splits"].values() for s in split["shards"])


OUTPUT_SPLITS: tuple[str, ...] = (
    "pretrain",
    "finetune",
    "val",
    "test/pope_random",
    "test/pope_popular",
    "test/pope_adversarial",
    "test/short_answer",
)


def write_world(
    out_dir: str | os.PathLike[str],
    cfg: WorldConfig | None = None,
    *,
    overwrite: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the whole world under ``out_dir`` and return its manifest.

    Layout: ``pretrain/``, ``finetune/``, ``val/``, ``test/pope_{random,popular,adversarial}/``
    and ``test/short_answer/``, each holding ``shard-XXXXXX.tar`` files, plus
    ``manifest.json`` (written last, so it marks a complete world).  If a manifest with
    the same config already exists the world is reused unless ``overwrite``.
    ``num_workers`` (default: all cores) only changes speed, never the output.
    """
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    old = _load_manifest(manifest_path)
    if not overwrite and _is_complete(old, cfg, out):
        assert old is not None
        return old

    # Remove what a previous (different or partial) run left, so no stale shard survives.
    manifest_path.unlink(missing_ok=True)
    for split in OUTPUT_SPLITS:
        for stale in sorted((out / split).glob("shard-*.tar")):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)

    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    total = cfg.train_images + cfg.val_images + cfg.test_images
    pool = multiprocessing.Pool(workers) if workers > 1 and total >= 64 else None
    bar = _progress_bar(total, progress)
    try:
        writers = {s: ShardedTarWriter(out, s, cfg.samples_per_shard) for s in ("pretrain", "finetune")}
        train_objects: list[list[WorldObject]] = []
        for objects, samples in _imap(partial(_train_image, cfg), cfg.train_images, pool, workers):
            train_objects.append(objects)
            for split, key, png, js in samples:
                writers[split].write(key, png, js)
            bar.update(1)
        stats = compute_stats(cfg, train_objects)

        images = {"pretrain": cfg.train_images, "finetune": cfg.train_images}
        for split, n in (("val", cfg.val_images), ("test", cfg.test_images)):
            for per_image in _imap(partial(_eval_image, cfg, split, stats), n, pool, workers):
                for out_split, key, png, js in per_image:
                    if out_split not in writers:
                        writers[out_split] = ShardedTarWriter(out, out_split, cfg.eval_samples_per_shard)
                        images[out_split] = n
                    w = writers[out_split]
                    # question_id = running index within the output split (known only here).
                    record = json.loads(js)
                    record["question_id"] = w.num_samples
                    w.write(key, png, _json_bytes(record))
                bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    for w in writers.values():
        w.close()

    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "splits": {
            name: {"shards": w.shards, "num_samples": w.num_samples, "num_images": images[name]}
            for name, w in writers.items()
        },
        "stats": stats,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="shapes world", unit="img")


# --------------------------------------------------------------------------- tokenizer corpus


def world_corpus(cfg: WorldConfig | None = None, n_examples: int = 200) -> list[str]:
    """Text lines covering every word/phrase the generator can emit (for a tiny BPE).

    Includes every caption fragment, every question with all slots filled, all answers,
    the fixed prompts and ``n_examples`` full example captions (drawn from a dedicated
    "corpus" stream, not from any split).  The ``<image>`` placeholder is not included:
    it is a special token for the tokenizer to add.
    """
    cfg = cfg or WorldConfig()
    positions = position_names(cfg.grid)
    lines: list[str] = [PRETRAIN_PROMPT, DESCRIBE_QUESTION, count_all_question()]
    lines += [t.split("{objects}")[0].strip() for t in CAPTION_TEMPLATES if not t.startswith("{")]
    for shape in cfg.shapes:
        lines += [color_question(shape), count_shape_question(shape), exist_question(shape), shape]
        for color in cfg.colors:
            lines.append(position_question(color, shape))
            lines += [object_phrase(shape, color, p) for p in positions]
            lines += [cell_phrase(p, shape, color) for p in positions]
            lines += [kind_phrase(shape, [(color, p)]) for p in positions]
    for color in cfg.colors:
        lines += [shape_question(color), color]
    lines += list(positions) + [position_phrase(p) for p in positions] + [cell_phrase(p) for p in positions]
    lines += [str(i) for i in range(cfg.max_objects + 1)] + ["Yes", "No", "yes", "no"]
    for i in range(n_examples):
        rng = image_rng(cfg, "corpus", i, 0)
        style = CAPTION_STYLES[i % len(CAPTION_STYLES)]
        lines.append(make_caption(replace(cfg, caption_style=style), sample_objects(cfg, rng), rng))
    return lines
