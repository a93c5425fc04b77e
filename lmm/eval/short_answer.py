"""Exact-match scorer for the project's own synthetic short-answer questions.

Both sides are normalised with :func:`lmm.eval.normalize.normalize_answer`
(lower-case, punctuation and non-decimal periods removed, articles dropped,
number words ``zero``..``ten`` turned into digits, contractions restored) and
then compared for equality: ``"Two."`` matches ``"2"``, ``"a dog"`` matches
``"dog"``.  A reference may also be a list of acceptable answers (any match
counts).  A missing prediction (``None``) is wrong.

Annotation format for the CLI: a JSON list or JSON lines of
``{"question_id", "answer"[, "category"]}`` records, where ``answer`` is a
string or a list of acceptable strings.  When some records have a category and
others do not, the latter are grouped under ``"(none)"``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from lmm.errors import AnnotationError
from lmm.eval.normalize import normalize_answer
from lmm.eval.predictions import (
    match_predictions,
    read_json_or_jsonl,
    read_predictions,
    report_counts,
)

__all__ = [
    "PROMPT_SUFFIX",
    "ShortAnswerQuestion",
    "evaluate",
    "is_correct",
    "load_annotations",
    "read_predictions",
    "short_answer_metrics",
]

PROMPT_SUFFIX = "Answer the question using a single word or phrase."

Reference = Union[str, Sequence[str]]


def is_correct(prediction: str | None, reference: Reference) -> bool:
    """Normalised exact match against one reference or any of several."""
    if prediction is None:
        return False
    refs = [reference] if isinstance(reference, str) else list(reference)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(r) for r in refs)


def short_answer_metrics(
    predictions: Sequence[str | None],
    references: Sequence[Reference],
    categories: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy of raw answers against references, overall and per category.

    Returns ``{"accuracy", "n", "correct", "missing", "per_category":
    {category: accuracy}, "per_category_n": {category: count}}`` (the two
    per-category dicts are empty when ``categories`` is None).
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"short_answer_metrics: {len(predictions)} predictions but {len(references)} references"
        )
    if categories is not None and len(categories) != len(references):
        raise ValueError(
            f"short_answer_metrics: {len(categories)} categories but {len(references)} references"
        )
    flags = [is_correct(p, r) for p, r in zip(predictions, references)]
    per_cat: dict[str, list[bool]] = defaultdict(list)
    for cat, flag in zip(categories or [], flags):
        per_cat[str(cat)].append(flag)
    n = len(flags)
    return {
        "accuracy": sum(flags) / n if n else 0.0,
        "n": n,
        "correct": sum(flags),
        "missing": sum(p is None for p in predictions),
        "per_category": {c: sum(v) / len(v) for c, v in sorted(per_cat.items())},
        "per_category_n": {c: len(v) for c, v in sorted(per_cat.items())},
    }


@dataclass(frozen=True)
class ShortAnswerQuestion:
    question_id: str
    answer: str | tuple[str, ...]
    category: str | None = None


def load_annotations(path: str | Path) -> list[ShortAnswerQuestion]:
    """Load ``{"question_id", "answer"[, "category"]}`` records."""
    path = Path(path)
    doc = read_json_or_jsonl(path)
    if isinstance(doc, dict):
        doc = [doc]
    out = []
    for i, rec in enumerate(doc, start=1):
        if not isinstance(rec, dict) or "question_id" not in rec or "answer" not in rec:
            raise AnnotationError(f"{path}: record {i} lacks 'question_id' or 'answer'")
        answer = rec["answer"]
        if not isinstance(answer, str):
            if not (
                isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)
            ):
                raise AnnotationError(
                    f"{path}: record {i}: 'answer' must be a string or list of strings"
                )
        category = rec.get("category")
        out.append(
            ShortAnswerQuestion(
                question_id=str(rec["question_id"]),
                answer=answer if isinstance(answer, str) else tuple(answer),
                category=None if category is None else str(category),
            )
        )
    if len({q.question_id for q in out}) != len(out):
        raise AnnotationError(f"{path}: repeated question_id")
    return out


def evaluate(
    questions: list[ShortAnswerQuestion], records: Iterable[dict[str, Any]]
) -> dict[str, Any]:
    """Score prediction records (``question_id``, ``text``)."""
    ids = {q.question_id for q in questions}
    match = match_predictions(
        records, lambda r: str(r["question_id"]) if str(r["question_id"]) in ids else None
    )
    preds = [
        match.by_key[q.question_id]["text"] if q.question_id in match.by_key else None
        for q in questions
    ]
    has_categories = any(q.category is not None for q in questions)
    out = short_answer_metrics(
        preds,
        [q.answer for q in questions],
        [q.category if q.category is not None else "(none)" for q in questions]
        if has_categories
        else None,
    )
    out.update(
        report_counts(
            [q.question_id for q in questions if q.question_id not in match.by_key], match
        )
    )
    return out
