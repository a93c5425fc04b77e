"""What every benchmark shares: reading a predictions JSONL file as LLaVA's eval scripts write it
(one JSON object per line with at least ``question_id`` and ``text``) and matching predictions to
annotation keys while counting every line that could not be used."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

from lmm.errors import AnnotationError

__all__ = [
    "AnnotationError",
    "MatchResult",
    "PredictionSet",
    "match_predictions",
    "match_subset",
    "parse_prediction_lines",
    "read_rows",
    "read_predictions",
    "read_json_or_jsonl",
    "report_counts",
]


def read_json_or_jsonl(path: str | Path) -> Any:
    """Load a file holding one JSON document, or JSON lines (e.g. POPE's ``.json``).

    Returns the document, or a list of the line objects for JSON lines.
    Raises :class:`AnnotationError` naming the file and line when neither parses.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AnnotationError(
                f"{path}: line {number} is not valid JSON ({exc.msg}); "
                "expected one JSON document or JSON lines"
            ) from None
    return items


def read_rows(path: Path, what: str) -> list[dict[str, Any]]:
    """A benchmark's table: TSV with a header row (MMBench, MMStar), or a JSON list / JSON lines
    of row objects for ``.json``/``.jsonl`` files. ``what`` names the rows in errors."""
    if path.suffix.lower() in (".json", ".jsonl"):
        doc = read_json_or_jsonl(path)
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise AnnotationError(f"{path}: expected a JSON list / JSON lines of {what}")
        return doc
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # an image column is base64
    with path.open("r", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@dataclass
class PredictionSet:
    """Valid prediction records in file order, plus the lines that were not."""

    records: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    source: str = "<memory>"


def _validate(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "question_id" not in obj or obj["question_id"] is None:
        return "no 'question_id'"
    if isinstance(obj["question_id"], (dict, list, bool)):
        return "'question_id' is not a string or number"
    if "text" not in obj:
        return "no 'text'"
    if not isinstance(obj["text"], str):
        return "'text' is not a string"
    return None


def parse_prediction_lines(lines: Iterable[str], source: str = "<memory>") -> PredictionSet:
    """Parse JSONL prediction lines; blank lines are ignored, bad ones recorded."""
    out = PredictionSet(source=source)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.malformed.append((number, f"bad JSON ({exc.msg})"))
            continue
        problem = _validate(obj)
        if problem is not None:
            out.malformed.append((number, problem))
            continue
        out.records.append(obj)
    return out


def read_predictions(path: str | Path) -> PredictionSet:
    """Read a LLaVA-style predictions JSONL file (``question_id`` + ``text`` per line).

    Raises ``FileNotFoundError``/``OSError`` for unreadable paths; bad lines do
    not raise but are listed in :attr:`PredictionSet.malformed`.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as handle:
        return parse_prediction_lines(handle, source=str(path))


@dataclass
class MatchResult:
    """Predictions keyed by annotation key, and what could not be matched."""

    by_key: dict[Hashable, dict[str, Any]]
    unknown: list[dict[str, Any]]
    duplicates: int

    def missing(self, keys: Iterable[Hashable]) -> list[Hashable]:
        return [k for k in keys if k not in self.by_key]


def match_predictions(
    records: Iterable[dict[str, Any]],
    resolve: Callable[[dict[str, Any]], Hashable | None],
) -> MatchResult:
    """Map each record to an annotation key with ``resolve`` (None = unknown)."""
    by_key: dict[Hashable, dict[str, Any]] = {}
    unknown: list[dict[str, Any]] = []
    duplicates = 0
    for record in records:
        key = resolve(record)
        if key is None:
            unknown.append(record)
            continue
        if key in by_key:
            duplicates += 1
        by_key[key] = record
    return MatchResult(by_key=by_key, unknown=unknown, duplicates=duplicates)


def match_subset(
    records: Iterable[dict[str, Any]], ids: set[str], others: set[str]
) -> tuple[MatchResult, int]:
    """Match records by ``str(question_id)`` to the scored ``ids``; records for ``others`` (the
    benchmark's questions outside the scored subset, e.g. ScienceQA's text-only ones) are set
    aside and counted (second value), not reported as unknown."""
    ignored = 0

    def resolve(rec: dict[str, Any]) -> Hashable | None:
        nonlocal ignored
        qid = str(rec["question_id"])
        if qid in ids:
            return qid
        if qid in others:
            ignored += 1
            return ("outside the subset", qid)  # never a scored key
        return None

    return match_predictions(records, resolve), ignored


def _show_key(key: Hashable) -> str:
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


def report_counts(
    missing_keys: list[Hashable], match: MatchResult, limit: int = 5
) -> dict[str, Any]:
    """The ``missing``/``unknown``/``duplicates`` counts every scorer reports.

    Also returns ``_examples`` (a few missing keys and unknown ids) which the
    CLI pops for its stderr warning; it is not part of the printed metrics.
    """
    return {
        "missing": len(missing_keys),
        "unknown": len(match.unknown),
        "duplicates": match.duplicates,
        "_examples": {
            "missing": [_show_key(k) for k in missing_keys[:limit]],
            "unknown": [str(r.get("question_id")) for r in match.unknown[:limit]],
        },
    }
