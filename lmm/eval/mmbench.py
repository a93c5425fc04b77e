"""MMBench scorer with circular evaluation.

Annotation format: the official dev TSV (``mmbench_dev_*.tsv``) with columns
``index, question, hint, A, B, C, D, answer, category, l2-category, split``
(plus ``image``, ``source``, ``comment``, which are ignored); a JSON list /
JSON lines of such rows is accepted too.  Options are read from ``A``, ``B``,
... up to the first empty one (empty, ``nan`` or ``none``, as LLaVA's
``get_options`` does).  Rows with no ``answer`` (the test split) are skipped and
counted as ``unlabelled``.

Circular evaluation (MMBench's CircularEval): a question counts as correct only
if *every* presentation of it with its options rotated is answered correctly.
Assumptions about how the presentations are given, in the order we apply them:

1. the official TSV ships the rotated copies as extra rows whose ``index`` is
   the base question's index plus a multiple of 1,000,000, each with its own
   rotated options and ``answer``; rows are grouped by ``index % 1_000_000``
   unless the file has an explicit ``group`` (or ``circular_group``) column,
   which then wins;
2. LLaVA's ``model_vqa_mmbench.py --all-rounds`` instead rotates the options of
   every row itself and writes ``question_id`` = index plus ``round_id``,
   ``options`` and ``option_char`` (the original letter shown at each
   position).  When any prediction has ``round_id`` > 0, every row is expected
   to have rounds ``0 .. len(options)-1``; the answered letter is mapped back
   through ``option_char`` (or, when absent, through the rotation by
   ``round_id`` that LLaVA applies) before comparison with ``answer``.

A missing presentation makes its question wrong (reported in ``missing``).

Choice extraction, per presentation: :func:`lmm.eval.scienceqa.extract_letter`
(``"B"``, ``"(B)"``, ``"B. cat"``, ``"The answer is B."``), then -- unlike
LLaVA, which falls back to ChatGPT -- matching against the option texts shown:
an answer equal to exactly one option, else contained in exactly one option
(LLaVA's rule), else mentioning exactly one option as a whole phrase.  Answers
that still do not resolve are wrong and counted in ``unparsed``.

Metrics: ``accuracy`` (circular, over questions), ``vanilla_accuracy`` (the
first presentation of each question only: lowest index, round 0), per
``category`` and ``l2-category`` circular accuracy, ``n`` (questions) and
``n_presentations``.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmm.errors import AnnotationError
from lmm.eval.predictions import (
    match_predictions,
    read_predictions,
    read_rows,
    report_counts,
)
from lmm.eval.scienceqa import extract_letter

__all__ = [
    "CIRCULAR_OFFSET",
    "PROMPT_SUFFIX",
    "MMBenchRow",
    "evaluate",
    "extract_choice",
    "load_annotations",
    "match_option_text",
    "mmbench_prompt",
    "read_predictions",
]

PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
CIRCULAR_OFFSET = 1_000_000
LETTERS = string.ascii_uppercase
_OPTION_COLUMNS = "ABCDEFGH"


def _is_none(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))
    )


def mmbench_prompt(
    question: str, options: Sequence[str], hint: str | None = None, suffix: str = PROMPT_SUFFIX
) -> str:
    """LLaVA-1.5's MMBench prompt: [hint\\n]question\\nA. opt\\nB. opt...\\nsuffix."""
    text = question if _is_none(hint) else f"{hint}\n{question}"
    for letter, option in zip(LETTERS, options):
        text += f"\n{letter}. {option}"
    return f"{text}\n{suffix}"


def _norm_text(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


def match_option_text(text: str, options: Sequence[str]) -> int | None:
    """Index of the single option the free-text answer names, or None."""
    t = _norm_text(text)
    if not t:
        return None
    norm = [_norm_text(str(o)) for o in options]
    for hits in (
        [i for i, o in enumerate(norm) if o == t],
        [i for i, o in enumerate(norm) if t in o],
        [i for i, o in enumerate(norm) if o and re.search(rf"(?<!\w){re.escape(o)}(?!\w)", t)],
    ):
        if len(hits) == 1:
            return hits[0]
    return None


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """Letter of the chosen option (as displayed), or None if it cannot be told."""
    letter = extract_letter(text, len(options))
    if letter is not None:
        return letter
    index = match_option_text(text, options)
    return None if index is None else LETTERS[index]


@dataclass(frozen=True)
class MMBenchRow:
    index: str
    group: str
    options: tuple[str, ...]
    answer: str
    category: str | None = None
    l2_category: str | None = None


@dataclass
class MMBenchAnnotations:
    rows: list[MMBenchRow]
    unlabelled: int = 0


def load_annotations(path: str | Path) -> MMBenchAnnotations:
    """Load MMBench rows (see the module docstring for grouping)."""
    path = Path(path)
    raw = read_rows(path, "rows")
    if not raw:
        raise AnnotationError(f"{path}: no rows")
    missing_cols = {"index", "question", "A", "B"} - set(raw[0])
    if missing_cols:
        raise AnnotationError(f"{path}: missing column(s) {sorted(missing_cols)}")
    out = MMBenchAnnotations(rows=[])
    for number, row in enumerate(raw, start=1):
        if _is_none(row.get("answer")):
            out.unlabelled += 1
            continue
        try:
            index = int(float(row["index"]))
        except (TypeError, ValueError):
            raise AnnotationError(
                f"{path}: row {number} has a non-integer index {row['index']!r}"
            ) from None
        options = []
        for col in _OPTION_COLUMNS:
            if _is_none(row.get(col)):
                break
            options.append(str(row[col]))
        answer = str(row["answer"]).strip().upper()
        if answer not in LETTERS[: len(options)]:
            raise AnnotationError(
                f"{path}: row {number} answer {row['answer']!r} is not one of its options"
            )
        explicit = row.get("group", row.get("circular_group"))
        out.rows.append(
            MMBenchRow(
                index=str(index),
                group=str(explicit) if not _is_none(explicit) else str(index % CIRCULAR_OFFSET),
                options=tuple(options),
                answer=answer,
                category=None if _is_none(row.get("category")) else str(row["category"]),
                l2_category=None if _is_none(row.get("l2-category")) else str(row["l2-category"]),
            )
        )
    if not out.rows:
        raise AnnotationError(f"{path}: no row has an answer (test split?)")
    if len({r.index for r in out.rows}) != len(out.rows):
        raise AnnotationError(f"{path}: repeated index")
    return out


def _round_of(rec: dict[str, Any]) -> int | None:
    value = rec.get("round_id", 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _displayed(row: MMBenchRow, rnd: int, rec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Options as shown in this presentation, and the original letter at each position."""
    n = len(row.options)
    options, chars = rec.get("options"), rec.get("option_char")
    if not (isinstance(options, list) and len(options) == n):
        options = list(row.options[rnd:] + row.options[:rnd])
    if not (isinstance(chars, list) and len(chars) == n and all(c in LETTERS[:n] for c in chars)):
        letters = list(LETTERS[:n])
        chars = letters[rnd:] + letters[:rnd]
    return [str(o) for o in options], list(chars)


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def evaluate(ann: MMBenchAnnotations, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score prediction records (``question_id`` = index, ``text``[, ``round_id``...])."""
    records = list(records)
    rows = {r.index: r for r in ann.rows}
    all_rounds = any((_round_of(rec) or 0) > 0 for rec in records)
    rounds_of = {r.index: list(range(len(r.options))) if all_rounds else [0] for r in ann.rows}
    expected = [(r.index, k) for r in ann.rows for k in rounds_of[r.index]]

    def resolve(rec: dict[str, Any]) -> tuple[str, int] | None:
        row = rows.get(str(rec["question_id"]))
        rnd = _round_of(rec)
        if row is None or rnd is None or not 0 <= rnd < (len(row.options) if all_rounds else 1):
            return None
        return (row.index, rnd)

    match = match_predictions(records, resolve)
    unparsed = 0
    correct: dict[tuple[str, int], bool] = {}
    for key in expected:
        rec = match.by_key.get(key)
        if rec is None:
            correct[key] = False
            continue
        row = rows[key[0]]
        options, chars = _displayed(row, key[1], rec)
        letter = extract_choice(rec["text"], options)
        if letter is None:
            unparsed += 1
            correct[key] = False
        else:
            correct[key] = chars[LETTERS.index(letter)] == row.answer

    groups: dict[str, list[MMBenchRow]] = defaultdict(list)
    for row in ann.rows:
        groups[row.group].append(row)
    circular: dict[str, bool] = {}
    vanilla: list[bool] = []
    per_cat: dict[str, list[bool]] = defaultdict(list)
    per_l2: dict[str, list[bool]] = defaultdict(list)
    for group, members in groups.items():
        circular[group] = all(correct[(m.index, k)] for m in members for k in rounds_of[m.index])
        first = min(members, key=lambda m: int(m.index))
        vanilla.append(correct[(first.index, 0)])
        if first.category is not None:
            per_cat[first.category].append(circular[group])
        if first.l2_category is not None:
            per_l2[first.l2_category].append(circular[group])
    out: dict[str, Any] = {
        "accuracy": _mean(list(circular.values())),
        "vanilla_accuracy": _mean(vanilla),
        "n": len(groups),
        "n_presentations": len(expected),
        "all_rounds": all_rounds,
        "per_category": {k: _mean(v) for k, v in sorted(per_cat.items())},
        "per_l2_category": {k: _mean(v) for k, v in sorted(per_l2.items())},
        "unparsed": unparsed,
        "unlabelled": ann.unlabelled,
    }
    out.update(report_counts([k for k in expected if k not in match.by_key], match))
    return out
