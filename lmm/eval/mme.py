"""MME scorer (yes/no questions, two per image, 14 subtasks).

Following MME's ``calculation.py``:

* a prediction is lower-cased; exactly ``yes``/``no`` is taken as is, otherwise
  its first four characters decide: containing ``yes`` -> yes, else containing
  ``no`` -> no, else "other" (always wrong).  So ``"Not really"`` -> no and
  ``"Yes, it is"`` -> yes.  We strip surrounding whitespace first (LLaVA strips
  its generations before writing them);
* per subtask, ``acc`` = share of questions answered right and ``acc_plus`` =
  share of images whose questions (two each) are all answered right;
  subtask score = ``(acc + acc_plus) * 100`` (0..200);
* perception score = sum over the 10 perception subtasks, cognition score = sum
  over the 4 cognition subtasks (names below, as MME spells them).  Subtasks
  absent from the annotations are listed under ``missing_subtasks`` and add 0.

A question with no prediction counts as "other" (wrong) and as ``missing``.

Annotation formats:

* the release directory (``MME_Benchmark_release_version``): one folder per
  subtask holding, per image, a ``<image stem>.txt`` of ``question<TAB>answer``
  lines, either next to the images or in ``questions_answers_YN/``; when some
  folders carry official subtask names, other folders are ignored;
* or a JSON list / JSON lines of ``{"question_id": "<subtask>/<image file>",
  "question", "answer"[, "category"]}`` records (the HF ``lmms-lab/MME`` layout).

Predictions as LLaVA writes them: ``question_id`` = ``"<subtask>/<image file>"``
(shared by the image's two questions), ``prompt`` = the question, ``text``.
They are matched on (subtask, image stem, question), the question compared
after removing the answer-format sentences, whitespace runs and case.  A
prediction without ``prompt``/``question`` takes the first still-unanswered
question of its image, in annotation order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from lmm.errors import AnnotationError
from lmm.eval.predictions import (
    match_predictions,
    read_json_or_jsonl,
    read_predictions,
    report_counts,
)

__all__ = [
    "COGNITION_SUBTASKS",
    "PERCEPTION_SUBTASKS",
    "PROMPT_SUFFIX",
    "MMEQuestion",
    "evaluate",
    "load_annotations",
    "mme_scores",
    "parse_yes_no",
    "read_predictions",
]

PROMPT_SUFFIX = "Please answer yes or no."
PERCEPTION_SUBTASKS: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION_SUBTASKS: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
_SHORT_SUFFIX = "Answer the question using a single word or phrase."


def parse_yes_no(text: str) -> str:
    """MME's answer parsing: "yes", "no" or "other"."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _norm_question(question: str) -> str:
    q = question.replace("<image>", " ").replace(_SHORT_SUFFIX, " ").replace(PROMPT_SUFFIX, " ")
    return " ".join(q.split()).lower()


@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image: str  # image file stem
    question: str
    answer: str  # "yes" / "no"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.subtask, self.image, _norm_question(self.question))


def _answer(value: Any, where: str) -> str:
    answer = str(value).strip().lower()
    if answer not in ("yes", "no"):
        raise AnnotationError(f"{where}: MME answers must be yes/no, got {value!r}")
    return answer


def _load_dir(root: Path) -> list[MMEQuestion]:
    out = []
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    official = [p for p in dirs if p.name in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS]
    for subtask_dir in official or dirs:  # other folders (e.g. eval_tool) are ignored
        qa_dir = subtask_dir / "questions_answers_YN"
        if not qa_dir.is_dir():
            qa_dir = subtask_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise AnnotationError(f"{txt}: line {number} is not 'question<TAB>answer'")
                out.append(
                    MMEQuestion(
                        subtask=subtask_dir.name,
                        image=txt.stem,
                        question=parts[0],
                        answer=_answer(parts[1], f"{txt}: line {number}"),
                    )
                )
    if not out:
        raise AnnotationError(
            f"{root}: no MME question files (<subtask>/[questions_answers_YN/]*.txt)"
        )
    return out


def _split_id(question_id: str) -> tuple[str, str]:
    parts = PurePosixPath(str(question_id).replace("\\", "/")).parts
    return parts[0], PurePosixPath(parts[-1]).stem


def _load_records(path: Path) -> list[MMEQuestion]:
    doc = read_json_or_jsonl(path)
    if not isinstance(doc, list):
        raise AnnotationError(f"{path}: expected a JSON list or JSON lines of MME questions")
    out = []
    for i, rec in enumerate(doc, start=1):
        if not isinstance(rec, dict) or not {"question_id", "question", "answer"} <= rec.keys():
            raise AnnotationError(f"{path}: record {i} lacks 'question_id', 'question' or 'answer'")
        subtask, image = _split_id(rec["question_id"])
        out.append(
            MMEQuestion(
                subtask=str(rec.get("category") or subtask),
                image=image,
                question=str(rec["question"]),
                answer=_answer(rec["answer"], f"{path}: record {i}"),
            )
        )
    return out


def load_annotations(path: str | Path) -> list[MMEQuestion]:
    """Load MME questions from the release directory or a records file."""
    path = Path(path)
    questions = _load_dir(path) if path.is_dir() else _load_records(path)
    keys = [q.key for q in questions]
    if len(set(keys)) != len(keys):
        raise AnnotationError(f"{path}: a question is repeated for the same image")
    return questions


def mme_scores(results: Iterable[tuple[str, str, bool]]) -> dict[str, Any]:
    """Aggregate ``(subtask, image, correct)`` triples into MME's scores."""
    per_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for subtask, image, correct in results:
        per_task[subtask][image].append(correct)
    subtasks = {}
    for name, images in sorted(per_task.items()):
        flags = [c for per_image in images.values() for c in per_image]
        acc = sum(flags) / len(flags)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        subtasks[name] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": (acc + acc_plus) * 100,
            "n": len(flags),
            "images": len(images),
        }
    perception = sum(subtasks[t]["score"] for t in PERCEPTION_SUBTASKS if t in subtasks)
    cognition = sum(subtasks[t]["score"] for t in COGNITION_SUBTASKS if t in subtasks)
    return {
        "perception_score": perception,
        "cognition_score": cognition,
        "total_score": perception + cognition,
        "subtasks": subtasks,
        "missing_subtasks": [
            t for t in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS if t not in subtasks
        ],
    }


def evaluate(questions: list[MMEQuestion], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score prediction records (``question_id``, ``text``, ``prompt``)."""
    keys = {q.key for q in questions}
    by_image: dict[tuple[str, str], list[tuple[str, str, str]]] = defaultdict(list)
    for q in questions:
        by_image[(q.subtask, q.image)].append(q.key)
    taken: set[tuple[str, str, str]] = set()

    def resolve(rec: dict[str, Any]) -> tuple[str, str, str] | None:
        subtask, image = _split_id(rec["question_id"])
        question = rec.get("prompt", rec.get("question"))
        if isinstance(question, str):
            key = (subtask, image, _norm_question(question))
            if key in keys:
                taken.add(key)
                return key
            return None
        for key in by_image.get((subtask, image), []):  # no question text: go by order
            if key not in taken:
                taken.add(key)
                return key
        return None

    match = match_predictions(records, resolve)
    other = 0
    triples = []
    for q in questions:
        rec = match.by_key.get(q.key)
        pred = parse_yes_no(rec["text"]) if rec is not None else "other"
        other += rec is not None and pred == "other"
        triples.append((q.subtask, q.image, pred == q.answer))
    out = mme_scores(triples)
    out["n"] = len(questions)
    out["unparsed"] = other
    out.update(report_counts([q.key for q in questions if q.key not in match.by_key], match))
    return out
