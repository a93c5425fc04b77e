"""ScienceQA-IMG scorer: multiple-choice accuracy on the questions with an image.

Annotation format: ScienceQA's ``problems.json`` -- a JSON object mapping problem
id to ``{"question", "choices": [...], "answer": <index>, "image": <file name or
null>, "split": "train"|"val"|"test", ...}``.  The path may be the file or the
directory holding it.  The split (default ``test``, LLaVA's) is taken from
``pid_splits.json`` next to ``problems.json`` when that file exists (this is
how ``minival`` etc. are defined), otherwise from each problem's ``split``.
The IMG subset is the problems whose ``image`` is set (the official
definition; LLaVA's script tests for ``<image>`` in the prompt, which is the
same set for its question file).

Predictions (``question_id`` = problem id, ``text``) are parsed by
:func:`extract_letter`; a prediction that yields no valid letter is wrong and
counted in ``unparsed``; a question with no prediction is wrong and counted in
``missing``.  Predictions for text-only problems of the split are counted in
``ignored_non_image``, not in ``unknown``.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lmm.errors import AnnotationError
from lmm.eval.predictions import match_subset, read_predictions, report_counts

__all__ = [
    "PROMPT_SUFFIX",
    "SQAQuestion",
    "evaluate",
    "extract_letter",
    "load_annotations",
    "read_predictions",
]

PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase

_LEADING_LETTER = re.compile(r"^\(?([A-Z])[).:]+(?=\s|$)")
_ANSWER_IS = re.compile(r"(?i:\banswer(?:\s+is)?)\s*:?\s*\(?([A-Z])(?![A-Za-z])")


def extract_letter(text: str, n_choices: int | None = None) -> str | None:
    """Find the chosen option letter in a generated answer, or None.

    Recognised, in this order (``X`` an upper-case letter):

    1. the whole answer is one letter, possibly wrapped in ``()``/``[]`` or
       followed by ``.``/``:`` (``"A"``, ``"(C)"``, ``"b."``; case-insensitive
       only here, where it cannot be a word);
    2. it *starts* with ``X.``, ``X)``, ``(X)`` or ``X:`` followed by a space or
       the end (``"B. a dog"``);
    3. it contains ``answer is X``/``answer: X``/``Answer is (X)``
       (``"The answer is (B)."``).

    ``"A dog"`` is not a letter answer.  The letter must be one of the first
    ``n_choices`` letters when that is given.
    """
    s = text.strip()
    letter = None
    bare = s.strip(" \t\n.:()[]")
    if len(bare) == 1 and bare.isalpha() and len(s) <= 4:
        letter = bare.upper()
    else:
        for pattern in (_LEADING_LETTER, _ANSWER_IS):
            match = pattern.search(s)
            if match:
                letter = match.group(1)
                break
    if letter is None:
        return None
    if n_choices is not None and letter not in LETTERS[:n_choices]:
        return None
    return letter


@dataclass(frozen=True)
class SQAQuestion:
    question_id: str
    choices: tuple[str, ...]
    answer: int

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


@dataclass
class SQAAnnotations:
    image_questions: list[SQAQuestion]
    non_image_ids: set[str]
    split: str | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc.msg})") from None


def load_annotations(path: str | Path, split: str | None = "test") -> SQAAnnotations:
    """Load ScienceQA problems of ``split`` (None = all) and keep the image subset."""
    path = Path(path)
    problems_path = path / "problems.json" if path.is_dir() else path
    problems = _read_json(problems_path)
    if not isinstance(problems, dict):
        raise AnnotationError(
            f"{problems_path}: expected an object mapping problem ids to problems"
        )
    ids = list(problems)
    splits_path = problems_path.parent / "pid_splits.json"
    if split is not None:
        if splits_path.is_file():
            splits = _read_json(splits_path)
            if split not in splits:
                raise AnnotationError(f"{splits_path}: no split {split!r}; has {sorted(splits)}")
            ids = [str(pid) for pid in splits[split]]
        else:
            ids = [
                pid
                for pid in ids
                if isinstance(problems[pid], dict) and problems[pid].get("split") == split
            ]
        if not ids:
            raise AnnotationError(f"{problems_path}: no problems in split {split!r}")
    out = SQAAnnotations(image_questions=[], non_image_ids=set(), split=split)
    for pid in ids:
        prob = problems.get(pid)
        if not isinstance(prob, dict) or "choices" not in prob or "answer" not in prob:
            raise AnnotationError(
                f"{problems_path}: problem {pid!r} missing or lacks 'choices'/'answer'"
            )
        if prob.get("image"):
            out.image_questions.append(
                SQAQuestion(
                    question_id=str(pid),
                    choices=tuple(str(c) for c in prob["choices"]),
                    answer=int(prob["answer"]),
                )
            )
        else:
            out.non_image_ids.add(str(pid))
    return out


def evaluate(ann: SQAAnnotations, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score prediction records (``question_id``, ``text``) on the IMG subset."""
    ids = {q.question_id for q in ann.image_questions}
    match, ignored = match_subset(records, ids, ann.non_image_ids)
    correct = unparsed = 0
    for q in ann.image_questions:
        rec = match.by_key.get(q.question_id)
        if rec is None:
            continue
        letter = extract_letter(rec["text"], len(q.choices))
        if letter is None:
            unparsed += 1
        elif letter == q.answer_letter:
            correct += 1
    n = len(ann.image_questions)
    out: dict[str, Any] = {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "correct": correct,
        "unparsed": unparsed,
        "split": ann.split,
        "ignored_non_image": ignored,
    }
    out.update(
        report_counts(
            [q.question_id for q in ann.image_questions if q.question_id not in match.by_key], match
        )
    )
    return out
