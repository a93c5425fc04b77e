"""The deterministic synthetic "shapes world": its settings and vocabulary.

The package splits the world at its seams: ``config`` (this module), ``scene`` (layout and
rendering), ``text`` (captions, questions), ``pope``, ``samples`` (per image), ``writer``
(shards), ``corpus`` (tokenizer text), ``multi`` (multi-image and video tasks), ``tiny``
(the tiny pipeline's world).


The world is a tiny, fully controlled stand-in for natural image/text data: small
RGB images holding 1-4 coloured shapes on a 3x3 grid, with captions, multi-turn
QA conversations and POPE-style object-probing questions that are exactly correct
by construction.  Everything is a pure function of ``(WorldConfig, seed)``:

* every image has its own random stream, seeded from ``(seed, split, index)``
  through :class:`numpy.random.SeedSequence` (never Python's salted ``hash``), so
  splits are independent, held out from each other and stable across runs;
* the layout (objects) and the texts use two separate sub-streams, so changing a
  text option (e.g. ``describe_prob``) does not change any image;
* shards are written by :mod:`lmm.data.tar_writer` (fixed member metadata), so the same
  config gives byte-identical ``.tar`` files.

Public entry points: :class:`WorldConfig`, :func:`make_image`,
:func:`sample_objects`, :func:`render`, :func:`make_caption`,
:func:`make_conversation`, :func:`short_answer_questions`, :func:`pope_questions`,
:func:`compute_stats`, :func:`write_world` and :func:`world_corpus`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

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

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects}.",
    "in the image: {objects}.",
    "the image has {objects}.",
)
CAPTION_STYLES: tuple[str, ...] = ("objects", "grid", "kinds")
PRETRAIN_PROMPT = "Describe the image briefly."
DESCRIBE_QUESTION = "Describe the image."
SHORT_ANSWER_CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "position")
CONVERSATION_CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "position", "exist")
POPE_STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")


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
    partner_pairs: tuple[tuple[str, str], ...] = (
        ("circle", "square"),
        ("triangle", "diamond"),
        ("cross", "star"),
    )
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
    caption_test_images: int = 150
    """The first this many test images also get a "Describe the image." sample (the describe
    turn of the finetune data) in ``test/caption``, whose generated captions are scored by CHAIR
    against the image's shape kinds (``gt_objects``). Other splits do not change with it."""
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
        unknown = [s for s in self.shapes if s not in SHAPE_KINDS]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; known: {sorted(SHAPE_KINDS)}")
        if len(set(self.shapes)) != len(self.shapes) or len(set(self.colors)) != len(self.colors):
            raise ValueError("shapes and colors must not contain duplicates")
        if self.shape_weights is not None and len(self.shape_weights) != len(self.shapes):
            raise ValueError("shape_weights must have one weight per shape")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError("need 1 <= min_objects <= max_objects <= grid*grid")
        if not 0.0 < self.size_range[0] <= self.size_range[1] <= 1.0:
            raise ValueError("size_range must satisfy 0 < low <= high <= 1")
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(
                f"unknown caption_style {self.caption_style!r}; choose one of {list(CAPTION_STYLES)}"
            )
        if (
            len(self.category_weights) != len(CONVERSATION_CATEGORIES)
            or min(self.category_weights) < 0
            or sum(self.category_weights) <= 0
        ):
            raise ValueError(
                f"category_weights needs {len(CONVERSATION_CATEGORIES)} non-negative weights "
                f"({', '.join(CONVERSATION_CATEGORIES)}), not all zero"
            )
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError("need 1 <= min_turns <= max_turns")
        if self.turns_per_sample < 0:
            raise ValueError("turns_per_sample must be >= 0 (0 = one conversation per image)")
        if self.caption_test_images < 0:
            raise ValueError("caption_test_images must be >= 0")
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
