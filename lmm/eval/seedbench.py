"""SEED-Bench-IMG scorer: the image questions (evaluation dimensions 1-9) of SEED-Bench(-1).

Annotation format: the official ``SEED-Bench.json`` (``{"questions": [...], "question_type":
{name: id}}``; each question has ``question_id``, ``question``, ``choice_a`` ... ``choice_d``,
``answer`` (a letter), ``question_type_id`` and ``data_type`` ("image" or "video")), or a JSON
list / JSON lines of such questions (e.g. rows of lmms-eval's ``lmms-lab/SEED-Bench``
without the images). The image subset is the questions with ``data_type == "image"``, or, when
a question has no ``data_type``, those of dimensions 1-9 (the official ``eval.py``'s
``filter_questions(task="image")``).

Predictions: ``question_id``, ``text``. The answer is read as lmms-eval's ``seedbench`` task
reads it (``seed_process_result``): the text stripped, its first character when longer,
compared with the answer letter. Likelihood-scored predictions (``predict --scoring
likelihood``) answer with the letter itself; generated ones should use the letter prompt
(``PROMPT_SUFFIX``).

Metrics: ``accuracy`` over the image questions (lmms-eval's ``seed_image``, the official
"image" total) and ``per_dimension`` accuracy, named as in ``question_type`` (else by id).
Predictions for video questions are counted in ``ignored_video``, not in ``unknown``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lmm.errors import AnnotationError
from lmm.eval.predictions import (
    match_subset,
    read_json_or_jsonl,
    read_predictions,
    report_counts,
)

__all__ = [
    "IMAGE_DIMENSIONS",
    "PROMPT_SUFFIX",
    "SeedQuestion",
    "SeedAnnotations",
    "evaluate",
    "load_annotations",
    "read_predictions",
    "read_choice",
]

PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
IMAGE_DIMENSIONS = range(1, 10)  # Scene Understanding ... Text Understanding


def read_choice(text: str) -> str:
    """lmms-eval's reading of an answer: stripped, the first character if longer."""
    text = text.strip()
    return text[0] if len(text) > 1 else text


@dataclass(frozen=True)
class SeedQuestion:
    question_id: str
    answer: str
    dimension: str


@dataclass
class SeedAnnotations:
    questions: list[SeedQuestion]
    video_ids: set[str]


def load_annotations(path: str | Path) -> SeedAnnotations:
    """The image questions of SEED-Bench (see the module docstring)."""
    path = Path(path)
    doc = read_json_or_jsonl(path)
    names: dict[str, str] = {}
    if isinstance(doc, dict):
        if not isinstance(doc.get("questions"), list):
            raise AnnotationError(f"{path}: expected SEED-Bench.json with a 'questions' list")
        names = {str(i): str(n) for n, i in (doc.get("question_type") or {}).items()}
        doc = doc["questions"]
    out = SeedAnnotations(questions=[], video_ids=set())
    for number, q in enumerate(doc, start=1):
        if not isinstance(q, dict) or "question_id" not in q or "answer" not in q:
            raise AnnotationError(f"{path}: question {number} lacks 'question_id' or 'answer'")
        qid = str(q["question_id"])
        dim = q.get("question_type_id")
        kind = q.get("data_type")
        if kind is None:
            if dim is None:
                raise AnnotationError(
                    f"{path}: question {qid} has neither 'data_type' nor 'question_type_id'"
                )
            kind = "image" if int(dim) in IMAGE_DIMENSIONS else "video"
        if kind != "image":
            out.video_ids.add(qid)
            continue
        dimension = names.get(str(dim), str(dim)) if dim is not None else "all"
        out.questions.append(SeedQuestion(qid, str(q["answer"]).strip(), dimension))
    if not out.questions:
        raise AnnotationError(f"{path}: no image questions")
    if len({q.question_id for q in out.questions}) != len(out.questions):
        raise AnnotationError(f"{path}: repeated question_id")
    return out


def evaluate(ann: SeedAnnotations, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score prediction records (``question_id``, ``text``) on the image questions."""
    match, ignored = match_subset(records, {q.question_id for q in ann.questions}, ann.video_ids)
    right: list[bool] = []
    per_dim: dict[str, list[bool]] = defaultdict(list)
    for q in ann.questions:
        rec = match.by_key.get(q.question_id)
        ok = rec is not None and read_choice(rec["text"]) == q.answer
        right.append(ok)
        per_dim[q.dimension].append(ok)
    n = len(ann.questions)
    out: dict[str, Any] = {
        "accuracy": sum(right) / n,
        "n": n,
        "correct": sum(right),
        "per_dimension": {k: sum(v) / len(v) for k, v in per_dim.items()},
        "ignored_video": ignored,
    }
    out.update(
        report_counts(
            [q.question_id for q in ann.questions if q.question_id not in match.by_key], match
        )
    )
    return out
