"""Captions, questions and conversations about a scene, exactly correct by construction."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from lmm.worlds.shapes.config import (
    CAPTION_TEMPLATES,
    CONVERSATION_CATEGORIES,
    DESCRIBE_QUESTION,
    SHORT_ANSWER_CATEGORIES,
    Turn,
    WorldConfig,
    WorldObject,
    position_names,
)
from lmm.worlds.shapes.scene import sample_objects


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
    return f"{shape}: " + ", ".join(
        f"{color} {position_phrase(position)}" for color, position in members
    )


def make_caption(cfg: WorldConfig, objects: Sequence[WorldObject], rng: np.random.Generator) -> str:
    """Caption in ``cfg.caption_style``: every object in row-major order with one of a few
    fixed templates, every cell in row-major order, or the objects grouped by kind."""
    names = position_names(cfg.grid)
    if cfg.caption_style == "grid":
        by_cell = {o.cell: o for o in objects}
        cells = [by_cell.get(c) for c in range(len(names))]
        return (
            ", ".join(cell_phrase(n, o and o.shape, o and o.color) for n, o in zip(names, cells))
            + "."
        )
    if cfg.caption_style == "kinds":
        ordered = sorted(objects, key=lambda o: o.cell)
        groups = [
            [(o.color, names[o.cell]) for o in ordered if o.shape == kind] for kind in cfg.shapes
        ]
        return (
            ". ".join(
                kind_phrase(kind, members) for kind, members in zip(cfg.shapes, groups) if members
            )
            + "."
        )
    parts = [
        object_phrase(o.shape, o.color, names[o.cell])
        for o in sorted(objects, key=lambda o: o.cell)
    ]
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
    cfg: WorldConfig,
    category: str,
    objects: Sequence[WorldObject],
    rng: np.random.Generator,
    used: set[str],
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
            (position_question(o.color, o.shape), names[o.cell])
            for o in objects
            if pair_n[(o.color, o.shape)] == 1
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
        pool = [
            s for s in cfg.shapes if (shape_n[s] > 0) == want_yes
        ]  # negatives: uniform over absent
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


def balanced_exist_turns(
    cfg: WorldConfig, objects: Sequence[WorldObject], rng: np.random.Generator
) -> list[Turn]:
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
    return [
        (exist_question(k), answer, "exist")
        for pair in zip(yes, no)
        for k, answer in zip(pair, ("Yes", "No"))
    ]


def _category_order(
    cfg: WorldConfig, rng: np.random.Generator, exclude_exist: bool = False
) -> np.ndarray:
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
        for idx in _category_order(
            cfg, rng, exclude_exist=cfg.balanced_exist
        ):  # fall back if impossible
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
    cfg: WorldConfig,
    objects: Sequence[WorldObject],
    rng: np.random.Generator,
    index: int,
    count: int,
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
