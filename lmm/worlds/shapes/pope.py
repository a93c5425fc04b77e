"""POPE-style object-probing questions: random, popular and adversarial negatives from the split's statistics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lmm.worlds.shapes.config import POPE_STRATEGIES, WorldConfig, WorldObject
from lmm.worlds.shapes.text import exist_question


def compute_stats(
    cfg: WorldConfig, object_lists: Iterable[Sequence[WorldObject]]
) -> dict[str, Any]:
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
    cfg: WorldConfig,
    present: Sequence[str],
    k: int,
    strategy: str,
    stats: dict[str, Any],
    rng: np.random.Generator,
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
