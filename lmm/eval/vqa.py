"""VQAv2 and TextVQA scorer (the VQA soft accuracy).

Accuracy of one answer: normalise the prediction and each of the (normally 10)
human answers with :func:`lmm.eval.normalize.normalize_answer`; for each of the
10 leave-one-out subsets of the human answers take ``min(1, matches / 3)``
where ``matches`` counts the subset's answers equal to the prediction; average
the 10 values.  (Equivalently to the m4c/TextVQA evaluator LLaVA uses; the
normalisation is applied to human answers as well as predictions, as EvalAI and
m4c do.)  Dataset accuracy is the mean over questions; a question with no
prediction scores 0 and is reported as ``missing``.

Annotation formats:

* VQAv2: ``v2_mscoco_val2014_annotations.json`` -- ``{"annotations": [{"question_id",
  "answers": [{"answer", ...} x 10], "answer_type", "question_type", ...}]}``;
  per-answer-type accuracy is reported too (the mean of per-question accuracy;
  note the official script's per-type numbers use only the last leave-one-out
  value, an acknowledged quirk we do not copy);
* TextVQA: ``TextVQA_0.5.1_val.json`` -- ``{"data": [{"question_id", "image_id",
  "question", "answers": [10 strings], "ocr_tokens", ...}]}``;
* or a bare JSON list / JSON lines of such records.

Predictions are matched by ``question_id``.  For TextVQA, LLaVA's question
file uses the *image* id as ``question_id`` and its evaluator matches on
``(image_id, question)`` recovered from the prediction's ``prompt``; a
prediction whose id is not a question id is matched that way when it has a
``prompt`` (or ``question``) field.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmm.errors import AnnotationError
from lmm.eval.normalize import normalize_answer
from lmm.eval.predictions import (
    match_predictions,
    read_json_or_jsonl,
    read_predictions,
    report_counts,
)

__all__ = [
    "OCR_PREFIX",
    "PROMPT_SUFFIX",
    "VQAQuestion",
    "evaluate",
    "load_annotations",
    "question_from_prompt",
    "read_predictions",
    "textvqa_prompt",
    "vqa_accuracy",
    "vqa_prompt",
]

PROMPT_SUFFIX = "Answer the question using a single word or phrase."
OCR_PREFIX = "Reference OCR token: "


def vqa_prompt(question: str, suffix: str = PROMPT_SUFFIX) -> str:
    """LLaVA-1.5's VQAv2/GQA/TextVQA prompt: the question, a newline, the suffix."""
    return f"{question}\n{suffix}"


def textvqa_prompt(
    question: str,
    ocr_tokens: Sequence[str] | None = None,
    *,
    max_tokens: int | None = None,
    suffix: str = PROMPT_SUFFIX,
) -> str:
    """TextVQA prompt, optionally with the OCR hint line LLaVA-1.5 used.

    ``"{question}\\nReference OCR token: tok1, tok2\\n{suffix}"``; the hint line
    is left out when there are no tokens.  ``max_tokens`` keeps the first ones.
    """
    tokens = list(ocr_tokens or [])
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if not tokens:
        return vqa_prompt(question, suffix)
    return f"{question}\n{OCR_PREFIX}{', '.join(tokens)}\n{suffix}"


_OLD_OCR_PROMPT = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: str) -> str:
    """Recover the (lower-cased) question from a TextVQA prompt, as LLaVA does."""
    if prompt.startswith("OCR tokens: "):
        match = _OLD_OCR_PROMPT.search(prompt)
        return (match.group(1) if match else prompt).lower()
    lines = prompt.split("\n")
    if lines[0].startswith(OCR_PREFIX.strip()) and len(lines) > 1:
        return lines[1].lower()
    return lines[0].lower()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft VQA accuracy of one prediction against the human answers."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    hits = [g == pred for g in gts]
    total_hits = sum(hits)
    # Leaving answer i out removes one match exactly when answer i matched.
    return sum(min(1.0, (total_hits - hit) / 3.0) for hit in hits) / len(gts)


@dataclass(frozen=True)
class VQAQuestion:
    question_id: str
    answers: tuple[str, ...]
    answer_type: str | None = None
    question_type: str | None = None
    image_id: str | None = None
    question: str | None = None


def _records(doc: Any, path: Path) -> list[Any]:
    if isinstance(doc, dict):
        for field in ("annotations", "data"):
            if isinstance(doc.get(field), list):
                return doc[field]
        raise AnnotationError(f"{path}: expected an 'annotations' (VQAv2) or 'data' (TextVQA) list")
    if isinstance(doc, list):
        return doc
    raise AnnotationError(f"{path}: expected a JSON object or list")


def load_annotations(path: str | Path) -> list[VQAQuestion]:
    """Load VQAv2 or TextVQA annotations (see the module docstring)."""
    path = Path(path)
    out = []
    for i, rec in enumerate(_records(read_json_or_jsonl(path), path), start=1):
        if not isinstance(rec, dict) or "question_id" not in rec or "answers" not in rec:
            raise AnnotationError(f"{path}: record {i} lacks 'question_id' or 'answers'")
        answers = tuple(str(a["answer"]) if isinstance(a, dict) else str(a) for a in rec["answers"])
        if not answers:
            raise AnnotationError(f"{path}: record {i} has no answers")
        out.append(
            VQAQuestion(
                question_id=str(rec["question_id"]),
                answers=answers,
                answer_type=rec.get("answer_type"),
                question_type=rec.get("question_type"),
                image_id=None if rec.get("image_id") is None else str(rec["image_id"]),
                question=rec.get("question"),
            )
        )
    if len({q.question_id for q in out}) != len(out):
        raise AnnotationError(f"{path}: repeated question_id")
    return out


def evaluate(questions: list[VQAQuestion], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score prediction records (``question_id``, ``text``[, ``prompt``])."""
    ids = {q.question_id for q in questions}
    by_image_question = {
        (q.image_id, q.question.lower()): q.question_id
        for q in questions
        if q.image_id is not None and q.question is not None
    }

    def resolve(rec: dict[str, Any]) -> str | None:
        qid = str(rec["question_id"])
        if qid in ids:
            return qid
        prompt = rec.get("prompt") or rec.get("question")
        if isinstance(prompt, str):
            return by_image_question.get((qid, question_from_prompt(prompt)))
        return None

    match = match_predictions(records, resolve)
    scores = []
    per_type: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        rec = match.by_key.get(q.question_id)
        score = vqa_accuracy(rec["text"], q.answers) if rec is not None else 0.0
        scores.append(score)
        if q.answer_type is not None:
            per_type[q.answer_type].append(score)
    out: dict[str, Any] = {
        "accuracy": sum(scores) / len(scores) if scores else 0.0,
        "n": len(questions),
    }
    if per_type:
        out["accuracy_per_answer_type"] = {t: sum(v) / len(v) for t, v in sorted(per_type.items())}
    out.update(
        report_counts(
            [q.question_id for q in questions if q.question_id not in match.by_key], match
        )
    )
    return out
