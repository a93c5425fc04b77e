"""Scoring the generation records that ``lmm test`` / validation collect per eval set."""

from __future__ import annotations

from typing import Any, Optional

from lmm.eval.chair import SynonymTable, chair_metrics, read_synonyms
from lmm.eval.normalize import normalize_answer
from lmm.eval.pope import parse_yes_no, pope_metrics, yes_probability
from lmm.eval.ranking import auc_roc
from lmm.eval.short_answer import short_answer_metrics


def is_correct(prediction: str, reference: str, category: str) -> bool:
    """One record: POPE parsing for yes/no probes, normalised exact match otherwise."""
    if category == "pope":
        return parse_yes_no(prediction) == reference.strip().lower()
    return normalize_answer(prediction) == normalize_answer(reference)


def score_eval_set(
    kind: str, records: list[dict[str, Any]], synonyms: Optional[str] = None
) -> dict[str, Any]:
    """Metrics of one eval set from records with ``text``, ``answer`` and ``category`` (and
    ``probs`` when likelihood-scored; ``gt_objects`` for ``chair``, scored through the
    ``synonyms`` file, or each distinct ground-truth word as its own category)."""
    predictions = [r["text"] for r in records]
    if kind == "chair":
        truths = [r["gt_objects"] for r in records]
        if synonyms is not None:
            table = read_synonyms(synonyms, coco_rules=False)
        else:
            table = SynonymTable.from_groups([[w] for t in truths for w in t])
        nodes = [{table.node(w) for w in t} for t in truths]
        unknown = sorted({w for t in truths for w in t if table.node(w) is None})
        if unknown:
            raise ValueError(
                f"chair: ground-truth objects {unknown} are not in the synonym table {synonyms}"
            )
        return chair_metrics(predictions, nodes, table)
    references = [r["answer"] for r in records]
    if kind == "pope":
        p_yes = [yes_probability(r) for r in records]
        return pope_metrics(
            predictions, references, p_yes if any(p is not None for p in p_yes) else None
        )
    return short_answer_metrics(predictions, references, [r["category"] for r in records])


def pooled_pope_auc(records: list[dict[str, Any]]) -> float | None:
    """AUC-ROC of P(yes) over the likelihood-scored records of all POPE sets together (as
    vlm-evaluation pools its splits), or None when none is scored."""
    pairs = [(yes_probability(r), r["answer"].strip().lower() == "yes") for r in records]
    pairs = [(p, y) for p, y in pairs if p is not None]
    return auc_roc([y for _, y in pairs], [p for p, _ in pairs]) if pairs else None


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
    if metrics.get("pope_auc_roc") is not None:
        lines.append(f"POPE AUC-ROC (pooled, likelihood): {metrics['pope_auc_roc']:.3f}")
    for name, m in metrics.items():
        if isinstance(m, dict) and "chair_i" in m:
            lines.append(
                f"{name}: CHAIR_s {m['chair_s']:.3f}  CHAIR_i {m['chair_i']:.3f}  "
                f"recall {m['recall']:.3f}  ({m['n']} captions)"
            )
    return "\n".join(lines)
