"""Exact-name registry of benchmark scorers.

``get_benchmark("pope")`` returns a :class:`Benchmark` bundling the annotation
reader, the predictions reader, the scorer and the LLaVA prompt suffix; an
unknown name raises :class:`lmm.registry.UnknownComponentError` (a
``ValueError``) that lists the known names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from lmm.errors import UnknownComponentError
from lmm.eval import (
    chair,
    gqa,
    mmbench,
    mme,
    mmstar,
    pope,
    scienceqa,
    seedbench,
    short_answer,
    vqa,
)
from lmm.eval.predictions import PredictionSet
from lmm.eval.predictions import read_predictions as _read_predictions
from lmm.registry import Registry

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "UnknownComponentError",
    "benchmark_names",
    "get_benchmark",
]


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    annotation_format: str
    prompt_suffix: str
    primary_metric: str
    load_annotations: Callable[..., Any]
    evaluate: Callable[[Any, Iterable[dict[str, Any]]], dict[str, Any]]
    read_predictions: Callable[[str | Path], PredictionSet] = _read_predictions
    # Benchmarks whose loader takes ``split=`` (POPE: one split; ScienceQA: test by default).
    supports_split: bool = False
    split_default: str | None = None
    # Further keyword options of the loader, given on the command line (CHAIR: synonyms).
    options: tuple[str, ...] = ()
    # What likelihood scoring (``predict --scoring likelihood``) compares: "Yes,No", the
    # option "letters" shown in each question, or None (an answer to be generated).
    likelihood_candidates: str | None = None

    def load(self, path: str | Path, split: str | None = None, **options: Any) -> Any:
        if split is not None and not self.supports_split:
            raise ValueError(f"benchmark {self.name!r} has no --split option")
        unknown = sorted(k for k, v in options.items() if v is not None and k not in self.options)
        if unknown:
            raise ValueError(f"benchmark {self.name!r} has no --{unknown[0]} option")
        kwargs = {k: v for k, v in options.items() if k in self.options}
        if self.supports_split:
            kwargs["split"] = split if split is not None else self.split_default
        return self.load_annotations(path, **kwargs)


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")

for _bench in (
    Benchmark(
        name="pope",
        description="POPE yes/no object probing: accuracy/precision/recall/F1 per split, mean F1",
        annotation_format="coco_pope_<split>.json (JSON lines: question_id, image, text, label) or a directory of them",
        prompt_suffix=pope.PROMPT_SUFFIX,
        primary_metric="mean_f1",
        load_annotations=pope.load_annotations,
        evaluate=pope.evaluate,
        supports_split=True,
        likelihood_candidates="Yes,No",
    ),
    Benchmark(
        name="vqav2",
        description="VQAv2 soft accuracy (EvalAI normalisation, 10 leave-one-out subsets)",
        annotation_format='v2_mscoco_*_annotations.json ({"annotations": [...]})',
        prompt_suffix=vqa.PROMPT_SUFFIX,
        primary_metric="accuracy",
        load_annotations=vqa.load_annotations,
        evaluate=vqa.evaluate,
    ),
    Benchmark(
        name="textvqa",
        description="TextVQA soft accuracy (as VQAv2)",
        annotation_format='TextVQA_0.5.1_val.json ({"data": [...]})',
        prompt_suffix=vqa.PROMPT_SUFFIX,
        primary_metric="accuracy",
        load_annotations=vqa.load_annotations,
        evaluate=vqa.evaluate,
    ),
    Benchmark(
        name="gqa",
        description="GQA testdev-balanced exact match (answers stripped, trailing '.' removed, lower-cased)",
        annotation_format="testdev_balanced_questions.json ({qid: {answer, types, isBalanced, ...}})",
        prompt_suffix=gqa.PROMPT_SUFFIX,
        primary_metric="accuracy",
        load_annotations=gqa.load_annotations,
        evaluate=gqa.evaluate,
    ),
    Benchmark(
        name="scienceqa_img",
        description="ScienceQA accuracy on the questions with an image (letter answers)",
        annotation_format="ScienceQA problems.json (or its directory, with pid_splits.json)",
        prompt_suffix=scienceqa.PROMPT_SUFFIX,
        primary_metric="accuracy",
        load_annotations=scienceqa.load_annotations,
        evaluate=scienceqa.evaluate,
        split_default="test",
        supports_split=True,
        likelihood_candidates="letters",
    ),
    Benchmark(
        name="mme",
        description="MME acc / acc+ per subtask, perception and cognition totals",
        annotation_format="MME_Benchmark_release_version directory, or JSON lines of "
        "{question_id: '<subtask>/<image>', question, answer}",
        prompt_suffix=mme.PROMPT_SUFFIX,
        primary_metric="perception_score",
        load_annotations=mme.load_annotations,
        evaluate=mme.evaluate,
        likelihood_candidates="Yes,No",
    ),
    Benchmark(
        name="mmbench",
        description="MMBench circular accuracy (all option rotations must be right)",
        annotation_format="mmbench_dev_*.tsv (index, question, hint, A-D, answer, category, l2-category, split)",
        prompt_suffix=mmbench.PROMPT_SUFFIX,
        primary_metric="accuracy",
        load_annotations=mmbench.load_annotations,
        evaluate=mmbench.evaluate,
        likelihood_candidates="letters",
    ),
    Benchmark(
        name="mmstar",
        description="MMStar accuracy (official answer check), per category and l2 category",
        annotation_format="MMStar.tsv (index, question, answer, category, l2_category) or JSON rows",
        prompt_suffix=mmstar.PROMPT_SUFFIX,
        primary_metric="accuracy",
        load_annotations=mmstar.load_annotations,
        evaluate=mmstar.evaluate,
        likelihood_candidates="letters",
    ),
    Benchmark(
        name="seedbench_img",
        description="SEED-Bench image questions (dimensions 1-9): accuracy, per dimension",
        annotation_format='SEED-Bench.json ({"questions": [...], "question_type": {...}}) or JSON rows',
        prompt_suffix=seedbench.PROMPT_SUFFIX,
        primary_metric="accuracy",
        load_annotations=seedbench.load_annotations,
        evaluate=seedbench.evaluate,
        likelihood_candidates="letters",
    ),
    Benchmark(
        name="chair",
        description="CHAIR_s / CHAIR_i object hallucination of captions (needs --synonyms for COCO)",
        annotation_format="folder of COCO instances_*.json / captions_*.json, or JSON lines "
        "of {image_id, objects}; predictions {image_id, caption} or {question_id, text}",
        prompt_suffix="",
        primary_metric="chair_i",
        load_annotations=chair.load_annotations,
        evaluate=chair.evaluate,
        read_predictions=chair.read_predictions,
        options=("synonyms",),
    ),
    Benchmark(
        name="short_answer",
        description="Normalised exact match for the project's synthetic questions, per category",
        annotation_format="JSON list / JSON lines of {question_id, answer, category?}",
        prompt_suffix=short_answer.PROMPT_SUFFIX,
        primary_metric="accuracy",
        load_annotations=short_answer.load_annotations,
        evaluate=short_answer.evaluate,
    ),
):
    BENCHMARKS.add(_bench.name, _bench)


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered under exactly ``name`` (no prefix matching)."""
    return BENCHMARKS.get(name)


def benchmark_names() -> list[str]:
    return BENCHMARKS.names()
