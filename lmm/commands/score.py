"""``python -m lmm score BENCH --annotations FILE --predictions FILE``.

Prints the benchmark's metrics as one JSON object on stdout.  Problems with the
predictions never disappear silently: the JSON carries

* ``malformed`` -- prediction lines that are not JSON objects with a
  ``question_id`` and a string ``text`` (skipped);
* ``missing`` -- questions with no usable prediction (scored as wrong: 0 VQA
  accuracy, a wrong yes/no or choice);
* ``unknown`` -- predictions whose id matches no question (ignored);
* ``duplicates`` -- extra predictions for an already answered question (the
  last one is used, as LLaVA's scripts do);
* ``unparsed`` (where the benchmark parses answers) -- predictions from which
  no answer could be read (scored as wrong);

and a human-readable warning for each non-zero count goes to stderr.

Exit status: 0 when scored (even with warnings); 2 for usage errors, an
unknown benchmark, a missing/unreadable file (the message names it) or an
annotations file of the wrong format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from lmm.errors import AnnotationError
from lmm.eval.registry import UnknownComponentError, benchmark_names, get_benchmark

__all__ = ["build_parser", "main", "score"]


class InputError(Exception):
    """A user-facing error: bad path, unreadable or ill-formed input."""


def build_parser() -> argparse.ArgumentParser:
    lines = []
    for name in benchmark_names():
        bench = get_benchmark(name)
        lines.append(
            f"  {name:<14} {bench.description}\n  {'':<14} annotations: {bench.annotation_format}"
        )
    parser = argparse.ArgumentParser(
        prog="python -m lmm score",
        description='Score a predictions JSONL file (LLaVA format: one {"question_id", "text"} '
        "object per line) against a benchmark's annotations; prints one JSON object.",
        epilog="benchmarks:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "benchmark",
        metavar="BENCH",
        help=f"benchmark name, exactly one of: {', '.join(benchmark_names())}",
    )
    parser.add_argument(
        "--annotations",
        required=True,
        metavar="FILE",
        help="the benchmark's official annotation file (or directory for pope/mme/scienceqa_img/chair); "
        "formats are listed below",
    )
    parser.add_argument(
        "--predictions",
        required=True,
        metavar="FILE",
        help="predictions JSONL: one JSON object per line with 'question_id' and 'text' "
        "(extra fields such as 'prompt', 'category', 'round_id' are used where relevant)",
    )
    parser.add_argument(
        "--split",
        default=None,
        metavar="NAME",
        help="subset to score, only for pope (random/popular/adversarial; default: all) "
        "and scienceqa_img (train/val/test/...; default: test)",
    )
    parser.add_argument(
        "--synonyms",
        default=None,
        metavar="FILE",
        help="chair only: the object synonym table (one category per line, "
        "'category, synonym, ...'; the CHAIR reference's synonyms.txt for COCO)",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="also write the JSON metrics to FILE",
    )
    return parser


def _check_path(path: str, what: str, allow_dir: bool) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file not found: {path}")
    if p.is_dir() and not allow_dir:
        raise InputError(f"{what} path is a directory, expected a file: {path}")
    return p


def score(
    benchmark: str,
    annotations: str | Path,
    predictions: str | Path,
    split: str | None = None,
    synonyms: str | Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score files; returns (metrics, details for warnings).  Raises on bad input."""
    bench = get_benchmark(benchmark)
    if split is not None and not bench.supports_split:
        raise InputError(f"--split is not supported for benchmark {bench.name!r}")
    if synonyms is not None and "synonyms" not in bench.options:
        raise InputError(f"--synonyms is only for chair, not for benchmark {bench.name!r}")
    ann_path = _check_path(str(annotations), "annotations", allow_dir=True)
    pred_path = _check_path(str(predictions), "predictions", allow_dir=False)
    options = {}
    if synonyms is not None:
        options["synonyms"] = _check_path(str(synonyms), "synonyms", allow_dir=False)
    try:
        ann = bench.load(ann_path, split=split, **options)
    except UnicodeDecodeError:
        raise InputError(f"annotations file is not UTF-8 text: {ann_path}") from None
    except AnnotationError as exc:
        raise InputError(f"bad annotations: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(f"bad annotations ({ann_path}): {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot read annotations {ann_path}: {exc.strerror or exc}") from None
    try:
        preds = bench.read_predictions(pred_path)
    except UnicodeDecodeError:
        raise InputError(f"predictions file is not UTF-8 text: {pred_path}") from None
    except OSError as exc:
        raise InputError(f"cannot read predictions {pred_path}: {exc.strerror or exc}") from None

    metrics = bench.evaluate(ann, preds.records)
    examples = metrics.pop("_examples", {})
    result = {
        "benchmark": bench.name,
        "primary_metric": bench.primary_metric,
        **metrics,
        "malformed": len(preds.malformed),
        "predictions_read": len(preds.records),
        "annotations_file": str(ann_path),
        "predictions_file": str(pred_path),
    }
    return result, {"examples": examples, "malformed": preds.malformed}


def _warn(result: dict[str, Any], details: dict[str, Any]) -> None:
    def emit(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    examples = details["examples"]
    if details["malformed"]:
        shown = "; ".join(f"line {n}: {why}" for n, why in details["malformed"][:5])
        emit(f"{len(details['malformed'])} malformed prediction line(s) skipped ({shown})")
    if result.get("missing"):
        emit(
            f"{result['missing']} question(s) have no prediction and are scored as wrong "
            f"(e.g. {', '.join(examples.get('missing', []))})"
        )
    if result.get("unknown"):
        emit(
            f"{result['unknown']} prediction(s) match no question and are ignored "
            f"(question_id e.g. {', '.join(examples.get('unknown', []))})"
        )
    if result.get("ambiguous"):
        emit(
            f"{result['ambiguous']} prediction(s) have an id shared by several POPE splits and no "
            "'category' field; they are counted as unknown"
        )
    if result.get("duplicates"):
        emit(
            f"{result['duplicates']} duplicate prediction(s); the last one for each question was used"
        )
    if result.get("unparsed"):
        emit(
            f"{result['unparsed']} prediction(s) could not be parsed into an answer and are scored as wrong"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        result, details = score(
            args.benchmark, args.annotations, args.predictions, args.split, args.synonyms
        )
    except UnknownComponentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _warn(result, details)
    text = json.dumps(result, indent=2)
    if args.output:
        try:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            print(
                f"error: cannot write output file {args.output}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
