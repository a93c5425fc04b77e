"""GQA (testdev-balanced) scorer.

GQA's official ``eval.py`` scores ``predicted == gold`` as a raw string match
over the questions whose ``isBalanced`` is true; LLaVA's
``convert_gqa_for_eval.py`` prepares each generated answer with
``text.rstrip('.').lower()`` (the generation itself is whitespace-stripped).
So :func:`gqa_normalize` is exactly: strip whitespace, strip trailing periods,
lower-case -- no article or number-word handling (GQA's gold answers are
already lower-case words such as ``"no"`` or ``"traffic light"``; the gold
answer is used as is).

Annotation format: ``testdev_balanced_questions.json`` -- a JSON object mapping
question id to ``{"answer", "isBalanced", "types": {"structural", "semantic",
...}, "imageId", "question", ...}``; a JSON list / JSON lines of records with
``question_id`` (or ``questionId``) and ``answer`` is accepted as well.
Questions with ``isBalanced: false`` are left out (reported as
``excluded_unbalanced``).  Besides overall accuracy we report the official
breakdowns that need only the annotation: per structural type, per semantic
type, and binary (structural ``verify``/``logical``/``compare``/``choose``)
vs open (structural ``query``).  Missing predictions are wrong.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lmm.errors import AnnotationError
from lmm.eval.predictions import (
    match_predictions,
    read_json_or_jsonl,
    read_predictions,
    report_counts,
)

__all__ = [
    "PROMPT_SUFFIX",
    "GQAQuestion",
    "evaluate",
    "gqa_normalize",
    "load_annotations",
    "read_predictions",
]

PROMPT_SUFFIX = "Answer the question using a single word or phrase."


def gqa_normalize(text: str) -> str:
    """LLaVA's GQA answer preparation: strip, drop trailing periods, lower-case."""
    return text.strip().rstrip(".").lower()


@dataclass(frozen=True)
class GQAQuestion:
    question_id: str
    answer: str
    structural: str | None = None
    semantic: str | None = None


@dataclass
class GQAAnnotations:
    questions: list[GQAQuestion]
    excluded_unbalanced: int = 0


def load_annotations(path: str | Path) -> GQAAnnotations:
    """Load GQA questions (see the module docstring)."""
    path = Path(path)
    doc = read_json_or_jsonl(path)
    if isinstance(doc, dict):
        items = [(qid, rec) for qid, rec in doc.items()]
    elif isinstance(doc, list):
        items = []
        for i, rec in enumerate(doc, start=1):
            qid = rec.get("question_id", rec.get("questionId")) if isinstance(rec, dict) else None
            if qid is None:
                raise AnnotationError(f"{path}: record {i} has no 'question_id'/'questionId'")
            items.append((qid, rec))
    else:
        raise AnnotationError(f"{path}: expected a JSON object mapping ids to questions")
    out = GQAAnnotations(questions=[])
    for qid, rec in items:
        if not isinstance(rec, dict) or "answer" not in rec:
            raise AnnotationError(f"{path}: question {qid!r} has no 'answer'")
        if rec.get("isBalanced") is False:
            out.excluded_unbalanced += 1
            continue
        types = rec.get("types") or rec.get("type") or {}
        out.questions.append(
            GQAQuestion(
                question_id=str(qid),
                answer=str(rec["answer"]),
                structural=types.get("structural"),
                semantic=types.get("semantic"),
            )
        )
    if len({q.question_id for q in out.questions}) != len(out.questions):
        raise AnnotationError(f"{path}: repeated question id")
    return out


def _mean_by(groups: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def evaluate(ann: GQAAnnotations, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score prediction records (``question_id``, ``text``)."""
    ids = {q.question_id for q in ann.questions}
    match = match_predictions(
        records, lambda r: str(r["question_id"]) if str(r["question_id"]) in ids else None
    )
    scores = []
    structural: dict[str, list[float]] = defaultdict(list)
    semantic: dict[str, list[float]] = defaultdict(list)
    answer_kind: dict[str, list[float]] = defaultdict(list)
    for q in ann.questions:
        rec = match.by_key.get(q.question_id)
        score = float(rec is not None and gqa_normalize(rec["text"]) == q.answer)
        scores.append(score)
        if q.structural is not None:
            structural[q.structural].append(score)
            answer_kind["open" if q.structural == "query" else "binary"].append(score)
        if q.semantic is not None:
            semantic[q.semantic].append(score)
    out: dict[str, Any] = {
        "accuracy": sum(scores) / len(scores) if scores else 0.0,
        "n": len(scores),
    }
    if answer_kind:
        out.update({f"accuracy_{k}": v for k, v in _mean_by(answer_kind).items()})
        out["accuracy_per_structural_type"] = _mean_by(structural)
    if semantic:
        out["accuracy_per_semantic_type"] = _mean_by(semantic)
    out["excluded_unbalanced"] = ann.excluded_unbalanced
    out.update(
        report_counts(
            [q.question_id for q in ann.questions if q.question_id not in match.by_key], match
        )
    )
    return out
