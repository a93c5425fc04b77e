"""MMStar scorer (Chen et al. 2024, 1500 vision-indispensable multiple-choice questions).

Annotation format: the dataset's ``MMStar.tsv`` (columns ``index, question, image, answer,
category, l2_category``; ``image`` is base64 and ignored here) or a JSON list / JSON lines of
the same rows (e.g. exported from the ``Lin-Chen/MMStar`` parquet). The options are part of
``question`` (``"...\\nOptions: A: ..., B: ..., C: ..., D: ..."``); ``answer`` is a letter.

Predictions: ``question_id`` = ``index``, ``text`` = the answer. A prediction is right by the
official rule (MMStar's ``eval/vlmeval/evaluate/mmstar.py``, ``MMStar_eval``): answer and
prediction lower-cased, stripped, newlines made spaces; right when the prediction's first
character is the answer letter, or it reads ``(x``, ``option x`` or ``the answer is x``.

Metrics: ``accuracy`` (the official "final score": right answers / questions), per
``category`` and per ``l2_category`` accuracy (right / questions of it; the official divides a
category by 250, its size in the full set), and ``macro_accuracy``: the unweighted mean of the
l2-category accuracies, which is lmms-eval's ``average`` (``mmstar_aggregate_results``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lmm.errors import AnnotationError
from lmm.eval.predictions import (
    match_predictions,
    read_predictions,
    read_rows,
    report_counts,
)

__all__ = [
    "PROMPT_SUFFIX",
    "MMStarQuestion",
    "evaluate",
    "is_right",
    "load_annotations",
    "read_predictions",
]

# lmms-eval's MMStar post-prompt (tasks/mmstar), the same as LLaVA's for multiple choice.
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly"


def is_right(prediction: str, answer: str) -> bool:
    """MMStar's official answer check (see the module docstring)."""
    answer = answer.lower().strip().replace("\n", " ")
    p = prediction.lower().strip().replace("\n", " ")
    for prefix in ("", "(", "option ", "the answer is "):
        if p.startswith(prefix) and len(p) > len(prefix) and p[len(prefix)] == answer:
            return True
    return False


@dataclass(frozen=True)
class MMStarQuestion:
    index: str
    answer: str
    category: str
    l2_category: str


def load_annotations(path: str | Path) -> list[MMStarQuestion]:
    """MMStar questions from the TSV or JSON rows (see the module docstring)."""
    path = Path(path)
    rows = read_rows(path, "MMStar rows")
    if not rows:
        raise AnnotationError(f"{path}: no rows")
    out = []
    for number, row in enumerate(rows, start=1):
        missing = [k for k in ("index", "answer", "category", "l2_category") if k not in row]
        if missing:
            raise AnnotationError(f"{path}: row {number} lacks {missing} (is this MMStar.tsv?)")
        answer = str(row["answer"]).strip()
        if len(answer) != 1 or not answer.isalpha():
            raise AnnotationError(f"{path}: row {number} answer {row['answer']!r} is not a letter")
        out.append(
            MMStarQuestion(
                index=str(row["index"]).strip(),
                answer=answer.upper(),
                category=str(row["category"]),
                l2_category=str(row["l2_category"]),
            )
        )
    if len({q.index for q in out}) != len(out):
        raise AnnotationError(f"{path}: repeated index")
    return out


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def evaluate(questions: list[MMStarQuestion], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score prediction records (``question_id`` = index, ``text``)."""
    ids = {q.index for q in questions}
    match = match_predictions(
        records,
        lambda r: str(r["question_id"]).strip() if str(r["question_id"]).strip() in ids else None,
    )
    right: dict[str, bool] = {}
    per_cat: dict[str, list[bool]] = defaultdict(list)
    per_l2: dict[str, list[bool]] = defaultdict(list)
    for q in questions:
        rec = match.by_key.get(q.index)
        right[q.index] = rec is not None and is_right(rec["text"], q.answer)
        per_cat[q.category].append(right[q.index])
        per_l2[q.l2_category].append(right[q.index])
    l2 = {k: _mean(v) for k, v in sorted(per_l2.items())}
    out: dict[str, Any] = {
        "accuracy": _mean(list(right.values())),
        "macro_accuracy": sum(l2.values()) / len(l2) if l2 else 0.0,
        "n": len(questions),
        "correct": sum(right.values()),
        "per_category": {k: _mean(v) for k, v in sorted(per_cat.items())},
        "per_l2_category": l2,
    }
    out.update(report_counts([q.index for q in questions if q.index not in match.by_key], match))
    return out
