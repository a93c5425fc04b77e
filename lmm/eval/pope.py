"""POPE (object-hallucination yes/no probing) scorer.

Annotation format: the POPE repository's ``coco_pope_{random,popular,adversarial}.json``
files, which are JSON *lines* with ``question_id``, ``image``, ``text`` and
``label`` ("yes"/"no").  The split comes from a record's ``category`` field if
it has one, else from the file name (``coco_pope_<split>.json``), else from the
file stem.  A directory is read as all its ``*pope_*.json*`` files.

Answer parsing is POPE's own (also LLaVA's ``eval_pope.py``): keep the text
before the first ``.``, delete commas, split on single spaces, and answer "no"
when one of the words is exactly ``No``, ``no`` or ``not``, "yes" otherwise.
Taken literally this means ``"Not really"`` parses as *yes* (``Not`` is not in
the word list) and an empty answer parses as yes; we keep those quirks.

Metrics per split (positive class = yes): accuracy, precision, recall, f1,
yes_ratio, n; over splits: the mean f1 and mean accuracy.

Likelihood-scored predictions (``python -m lmm predict --scoring likelihood``) carry
``probs``, the candidates' probabilities renormalised over the candidates (``{"Yes": 0.8,
"No": 0.2}``); their ``text`` is the most likely candidate, so the metrics above are those
at the argmax. For them each split also gets ``auc_roc`` over P(yes) (the questions that
have one), and the whole set ``auc_roc`` on the pooled questions of all splits, as
vlm-evaluation's ``PopeScorer`` computes it (``roc_auc_score`` on the pooled examples).

Definitional choices (the reference divides by zero or silently mis-zips):

* precision/recall/f1 with a zero denominator are 0.0;
* a question with no prediction counts as the wrong answer (a yes-question as a
  false negative, a no-question as a false positive) and is reported as
  ``missing``; ``yes_ratio`` is over the predictions that exist;
* POPE's split files restart their ``question_id`` at 1, so a prediction that
  does not name its split (``category`` or ``split`` field) is matched only when
  its id is unique across the loaded splits; otherwise it is reported as
  ``ambiguous`` (and counted in ``unknown``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmm.errors import AnnotationError
from lmm.eval.predictions import (
    match_predictions,
    read_json_or_jsonl,
    read_predictions,
    report_counts,
)
from lmm.eval.ranking import auc_roc

__all__ = [
    "PROMPT_SUFFIX",
    "SPLITS",
    "PopeQuestion",
    "evaluate",
    "load_annotations",
    "parse_yes_no",
    "pope_metrics",
    "read_predictions",
    "yes_probability",
]

PROMPT_SUFFIX = "Answer the question using a single word or phrase."
SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
_SPLIT_FROM_NAME = re.compile(r"pope_([A-Za-z0-9]+)\.jsonl?$")


def parse_yes_no(text: str) -> str:
    """POPE's official answer parsing; returns "yes" or "no"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def yes_probability(record: dict[str, Any] | None) -> float | None:
    """P(yes) of a likelihood-scored record (the ``probs`` of its "yes" candidates), or None."""
    probs = (record or {}).get("probs")
    if not isinstance(probs, dict):
        return None
    found = [float(p) for k, p in probs.items() if str(k).strip().lower() == "yes"]
    return sum(found) if found else None


def _auc(p_yes: Sequence[float | None], labels: Sequence[str]) -> float | None:
    pairs = [(p, _label(y) == "yes") for p, y in zip(p_yes, labels) if p is not None]
    return auc_roc([y for _, y in pairs], [p for p, _ in pairs])


def _label(value: Any) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {value!r}")
    return label


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_metrics(
    predictions: Sequence[str | None],
    labels: Sequence[str],
    p_yes: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """Score raw generated answers against "yes"/"no" labels, POPE style.

    ``predictions[i]`` is the model's raw text for question i (``None`` =
    no prediction, counted wrong).  Returns accuracy, precision, recall, f1,
    yes_ratio (share of existing predictions parsed as yes), n, tp/fp/tn/fn and
    missing; with ``p_yes`` (P(yes) per question, None where unknown) also
    ``auc_roc`` over the questions that have one (None if a class is absent).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope_metrics: {len(predictions)} predictions but {len(labels)} labels")
    tp = fp = tn = fn = 0
    yes = answered = missing = 0
    for text, raw_label in zip(predictions, labels):
        label = _label(raw_label)
        if text is None:
            missing += 1
            pred = "no" if label == "yes" else "yes"  # wrong by construction
        else:
            pred = parse_yes_no(text)
            answered += 1
            yes += pred == "yes"
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    n = len(labels)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    scored = {} if p_yes is None else {"auc_roc": _auc(p_yes, labels)}
    return {
        **scored,
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(yes, answered),
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "missing": missing,
    }


@dataclass(frozen=True)
class PopeQuestion:
    split: str
    question_id: str
    text: str
    image: str
    label: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.split, self.question_id)


def _split_of_file(path: Path) -> str:
    match = _SPLIT_FROM_NAME.search(path.name)
    return match.group(1) if match else path.stem


def _load_file(path: Path) -> list[PopeQuestion]:
    doc = read_json_or_jsonl(path)
    records = doc if isinstance(doc, list) else [doc]
    default_split = _split_of_file(path)
    out = []
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, dict) or "question_id" not in rec or "label" not in rec:
            raise AnnotationError(f"{path}: record {i} lacks 'question_id' or 'label'")
        try:
            label = _label(rec["label"])
        except ValueError as exc:
            raise AnnotationError(f"{path}: record {i}: {exc}") from None
        out.append(
            PopeQuestion(
                split=str(rec.get("category") or default_split),
                question_id=str(rec["question_id"]),
                text=str(rec.get("text", "")),
                image=str(rec.get("image", "")),
                label=label,
            )
        )
    return out


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split), "") if split in SPLITS else (len(SPLITS), split)


def load_annotations(path: str | Path, split: str | None = None) -> list[PopeQuestion]:
    """Load POPE question/label files (a file or a directory of them).

    ``split`` keeps only that split.  Questions come back ordered by split
    (random, popular, adversarial, then others) and file order within a split.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _SPLIT_FROM_NAME.search(p.name))
        if not files:
            raise AnnotationError(f"{path}: no coco_pope_<split>.json files in this directory")
    else:
        files = [path]
    questions = [q for f in files for q in _load_file(f)]
    if split is not None:
        questions = [q for q in questions if q.split == split]
        if not questions:
            raise AnnotationError(f"{path}: no questions of POPE split {split!r}")
    keys = [q.key for q in questions]
    if len(set(keys)) != len(keys):
        raise AnnotationError(f"{path}: repeated (split, question_id) pairs")
    order = {s: _split_order(s) for s in {q.split for q in questions}}
    return sorted(questions, key=lambda q: order[q.split])  # stable sort keeps file order


def evaluate(questions: list[PopeQuestion], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score prediction records (``question_id``, ``text``, optional ``category``)."""
    keys = {q.key for q in questions}
    splits_of_id: dict[str, list[str]] = defaultdict(list)
    for q in questions:
        splits_of_id[q.question_id].append(q.split)
    ambiguous = 0

    def resolve(rec: dict[str, Any]) -> tuple[str, str] | None:
        nonlocal ambiguous
        qid = str(rec["question_id"])
        split = rec.get("category") or rec.get("split")
        if split is not None:
            key = (str(split), qid)
            return key if key in keys else None
        candidates = splits_of_id.get(qid, [])
        if len(candidates) == 1:
            return (candidates[0], qid)
        ambiguous += len(candidates) > 1
        return None

    match = match_predictions(records, resolve)
    by_split: dict[str, list[PopeQuestion]] = defaultdict(list)
    for q in questions:
        by_split[q.split].append(q)
    p_yes = {q.key: yes_probability(match.by_key.get(q.key)) for q in questions}
    scored = any(p is not None for p in p_yes.values())
    per_split = {}
    for split, qs in by_split.items():
        texts = [match.by_key[q.key]["text"] if q.key in match.by_key else None for q in qs]
        probs = [p_yes[q.key] for q in qs] if scored else None
        per_split[split] = pope_metrics(texts, [q.label for q in qs], probs)
    n_splits = len(per_split)
    pooled = {}
    if scored:
        pooled["auc_roc"] = _auc([p_yes[q.key] for q in questions], [q.label for q in questions])
    return {
        **pooled,
        "mean_f1": _ratio(sum(m["f1"] for m in per_split.values()), n_splits),
        "mean_accuracy": _ratio(sum(m["accuracy"] for m in per_split.values()), n_splits),
        "splits": per_split,
        "n": len(questions),
        **report_counts([q.key for q in questions if q.key not in match.by_key], match),
        "ambiguous": ambiguous,
    }
