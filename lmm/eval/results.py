"""Scoring the generation records that ``lmm test`` / validation collect per eval set."""

from __future__ import annotations

from typing import Any

from lmm.eval.normalize import normalize_answer
from lmm.eval.pope import parse_yes_no, pope_metrics
from lmm.eval.short_answer import short_answer_metrics


def is_correct(prediction: str, reference: str, category: str) -> bool:
    """One record: POPE parsing for yes/no probes, normalised exact match otherwise."""
    if category == "pope":
        return parse_yes_no(prediction) == reference.strip().lower()
    return normalize_answer(prediction) == normalize_answer(reference)


def score_eval_set(kind: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of one eval set from records with ``text``, ``answer`` and ``category``."""
    predictions = [r["text"] for r in records]
    references = [r["answer"] for r in records]
    if kind == "pope":
        return pope_metrics(predictions, references)
    return short_answer_metrics(predictions, references, [r["category"] for r in records])


def summary_table(metrics: dict[str, Any]) -> str:
    """Human-readable table of the headline numbers per set."""
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")
    lines = [f"{'set':<22}" + "".join(f"{k:>10}" for k in keys)]
    for name, m in metrics.items():
        if not isinstance(m, dict) or "accuracy" not in m:
            continue
        cells = "".join(
            f"{m[k]:>10.3f}" if isinstance(m.get(k), float) else f"{m.get(k, ''):>10}" for k in keys
        )
        lines.append(f"{name:<22}{cells}")
    if "pope_mean_f1" in metrics:
        lines.append(f"POPE mean F1: {metrics['pope_mean_f1']:.3f}")
    return "\n".join(lines)
