"""Batched answers from a trained model, and ``python -m lmm predict`` over a LLaVA question file.

:class:`Predictor` is the one generation path outside the Trainer: ``predict``, ``chat``, the
lmms-eval adapter and ``benchmarks/eval_throughput.py`` all use it. Prompts are built exactly
as ``lmm test`` builds them (the checkpoint's conversation template, ``<image>`` expanded to
the model's image-token count by :class:`lmm.data.encode.SampleEncoder`), batched with left
padding and decoded with the KV cache.

Question file (JSON lines, as LLaVA's ``model_vqa_loader`` reads them)::

    {"question_id": 17, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?"}

Answer file (JSON lines, as LLaVA writes them; ``lmm score`` and LLaVA's scripts read it)::

    {"question_id": 17, "prompt": "Is there a dog ...", "text": "Yes", "answer_id": "...",
     "model_id": "finetune", "metadata": {}}

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process answers every n-th question and rank 0
writes all answers in the question file's order.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image

from lmm.data.collate import collate
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.prompts import PromptConventions
from lmm.data.templates import Template, stop_token_ids
from lmm.errors import SampleError
from lmm.inference.likelihood import Candidates, candidate_probs, candidates_for
from lmm.model.lmm import LMM, GenerationConfig

# -- prompts and generation ----------------------------------------------------------------------


class Predictor:
    """Answers conversations about images with a model and a conversation template.

    Args:
        model: The model (in eval mode, on its device).
        template: Conversation template the model was trained with.
        generation: Default decoding settings.
        max_length: Longest prompt in tokens (after ``<image>`` expansion).
        batch_size: Prompts per generation batch.
        conventions: How the model was trained to be asked (``<image>`` placement and position,
            tokenization, answer suffixes); the checkpoint's, so prompts match training.
    """

    def __init__(
        self,
        model: LMM,
        template: Template,
        generation: GenerationConfig = GenerationConfig(),
        max_length: int = 2048,
        batch_size: int = 16,
        conventions: PromptConventions = PromptConventions(),
    ) -> None:
        self.model = model
        self.generation = generation
        self.batch_size = batch_size
        self.conventions = conventions
        tok = model.tokenizer
        processor = Processor(
            tok,
            model.vision.image_spec,
            model.num_image_tokens,
            model.image_token_id,
            model.image_layout,
        )
        self.encoder = SampleEncoder(
            processor,
            template,
            max_length,
            image_placement=conventions.image_placement,
            tokenization=conventions.tokenization,
        )
        self.template = self.encoder.template  # bound to the tokenizer
        self.stop_ids = stop_token_ids(tok, self.template)
        self._candidates: dict[tuple[str, ...], Candidates] = {}

    @classmethod
    def from_checkpoint(cls, ckpt, batch_size: int = 16, **generation: Any) -> "Predictor":
        """From a loaded :class:`lmm.checkpoints.directory.Checkpoint`; ``generation`` overrides its defaults."""
        gen = replace(ckpt.generation, **{k: v for k, v in generation.items() if v is not None})
        return cls(ckpt.model, ckpt.template, gen, ckpt.max_length, batch_size, ckpt.conventions)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(
        self, conversations: list[dict], images: Sequence[Image.Image], sample_id: str = "prompt"
    ) -> dict:
        """LLaVA-schema turns ending with a user turn (+ its images) -> prompt sample.

        Raises :class:`lmm.data.errors.SampleError` (``overlong``, ``image_count``, ``malformed``).
        """
        return self.encoder.encode_prompt(
            {"id": sample_id, "conversations": conversations}, list(images)
        )

    def encode_question(
        self, text: str, images: Sequence[Image.Image], sample_id: str = "prompt"
    ) -> dict:
        """A single question (its images placed by ``conventions.image_position``) -> prompt sample."""
        return self.encode(
            [{"from": "human", "value": self.conventions.question_turn(text, len(images))}],
            images,
            sample_id,
        )

    @torch.no_grad()
    def generate(
        self, samples: list[dict], generation: Optional[GenerationConfig] = None
    ) -> list[str]:
        """Answers for encoded prompts (one generation batch; order kept)."""
        if not samples:
            return []
        g = generation or self.generation
        batch = collate(samples, pad_id=self.model.tokenizer.pad_token_id, left=True)
        dev = self.device
        return self.model.generate_text(
            batch["input_ids"].to(dev),
            batch["attention_mask"].to(dev),
            batch["pixel_values"].to(dev),
            stop_token_ids=self.stop_ids,
            **g.kwargs(),
        )

    def generate_all(
        self,
        samples: list[dict],
        generation: Optional[GenerationConfig] = None,
        batch_size: Optional[int] = None,
    ) -> list[str]:
        """Answers for any number of prompts, in their order.

        Prompts are batched by length (longest first), which keeps padding low; under greedy
        decoding the answers do not depend on the batching (tests check this).
        """
        answers: list[str] = [""] * len(samples)
        for idx in self._length_batches(samples, batch_size):
            for i, text in zip(idx, self.generate([samples[i] for i in idx], generation)):
                answers[i] = text
        return answers

    def _length_batches(self, samples: list[dict], batch_size: Optional[int]) -> list[list[int]]:
        """Sample indices in batches of similar length, longest first."""
        n = batch_size or self.batch_size
        by_length = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
        return [by_length[start : start + n] for start in range(0, len(by_length), n)]

    def candidates(self, labels: Sequence[str]) -> Candidates:
        """The tokens that score ``labels`` (``lmm.inference.likelihood``), computed once."""
        key = tuple(labels)
        if key not in self._candidates:
            self._candidates[key] = candidates_for(self.model.tokenizer, self.template, key)
        return self._candidates[key]

    @torch.no_grad()
    def score_candidates(
        self,
        samples: list[dict],
        labels: Sequence[Sequence[str]],
        batch_size: Optional[int] = None,
    ) -> list[dict[str, float]]:
        """``{candidate: probability}`` per encoded prompt, renormalised over its candidates
        ``labels[i]`` (``lmm.inference.likelihood``); one forward pass per batch, batched by
        length like :meth:`generate_all`."""
        out: list[dict[str, float]] = [{} for _ in samples]
        dev = self.device
        for idx in self._length_batches(samples, batch_size):
            batch = collate(
                [samples[i] for i in idx], pad_id=self.model.tokenizer.pad_token_id, left=True
            )
            probs = candidate_probs(
                self.model,
                batch["input_ids"].to(dev),
                batch["attention_mask"].to(dev),
                batch["pixel_values"].to(dev),
                [self.candidates(labels[i]) for i in idx],
            )
            for i, p in zip(idx, probs):
                out[i] = p
        return out


# -- `python -m lmm predict` ---------------------------------------------------------------------


def read_questions(path: str | Path) -> list[dict]:
    """A LLaVA question file: one JSON object per line with ``question_id`` and ``text``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--questions {str(path)!r}: no such file")
    questions = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({err.msg}); expected one question object per line"
                ) from None
            if (
                not isinstance(q, dict)
                or "question_id" not in q
                or not isinstance(q.get("text"), str)
            ):
                raise ValueError(
                    f"{path}:{number}: expected an object with 'question_id' and a string 'text'"
                )
            questions.append(q)
    return questions


def _load_image(folder: Path, name: str) -> Image.Image:
    path = folder / name
    if not path.is_file():
        raise SampleError(
            "image_decode", f"image {str(path)!r} does not exist (check --image-folder)"
        )
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as err:  # PIL raises many types for bad files
        raise SampleError("image_decode", f"image {str(path)!r} is not readable ({err})") from None


def answer_questions(
    predictor: Predictor,
    questions: list[dict],
    image_folder: Path,
    model_id: str,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    candidates: Optional[Callable[[dict], Sequence[str]]] = None,
    answer_suffix: Optional[str] = None,
) -> list[dict]:
    """LLaVA-style answer records for this rank's share of ``questions`` (tagged with ``order``).

    With ``candidates`` (question -> its candidate answers) the questions are scored by
    likelihood instead of generation: ``text`` is the most likely candidate and ``probs``
    holds every candidate's probability, renormalised over them.

    ``answer_suffix``: a benchmark name whose answer instruction (the checkpoint's
    ``answer_suffixes``) is appended to every question, as the reference evaluates it.

    A question that cannot be answered (missing image, prompt over max_length, no candidates)
    gets an empty answer and an ``error`` field instead of stopping the run.
    """
    mine = list(range(rank, len(questions), world_size))
    records: list[dict] = []
    step = predictor.batch_size * 8  # decode images a chunk at a time, not all at once
    started = time.perf_counter()
    for start in range(0, len(mine), step):
        chunk = mine[start : start + step]
        samples, ok, errors, labels = [], [], {}, []
        asked = {
            i: predictor.conventions.with_answer_suffix(questions[i]["text"], answer_suffix)
            for i in chunk
        }
        for i in chunk:
            q = questions[i]
            try:
                if candidates is not None:
                    labels.append(tuple(candidates(q)))
                images = [_load_image(image_folder, q["image"])] if q.get("image") else []
                samples.append(predictor.encode_question(asked[i], images, str(q["question_id"])))
                ok.append(i)
            except (SampleError, ValueError) as err:
                errors[i] = str(err)
                labels = labels[: len(ok)]
        probs: dict[int, dict[str, float]] = {}
        if candidates is None:
            answers = dict(zip(ok, predictor.generate_all(samples)))
        else:
            probs = dict(zip(ok, predictor.score_candidates(samples, labels)))
            answers = {i: max(p, key=p.get) for i, p in probs.items()}
        for i in chunk:
            q = questions[i]
            rec = {
                "order": i,
                "question_id": q["question_id"],
                "prompt": asked[i],
                "text": answers.get(i, ""),
                "answer_id": uuid.uuid4().hex[:22],
                "model_id": model_id,
                "metadata": {},
            }
            if i in probs:
                rec["probs"] = probs[i]
            if i in errors:
                rec["error"] = errors[i]
            records.append(rec)
        if progress:
            done = start + len(chunk)
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(
                f"[rank {rank}] {done}/{len(mine)} questions ({rate:.1f}/s)",
                file=sys.stderr,
                flush=True,
            )
    return records


def load_for_inference(ckpt_dir: str, device: Optional[str], dtype: str):
    """Load a checkpoint directory onto ``device`` (default: cuda if available)."""
    from lmm.checkpoints.directory import load_checkpoint_dir

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_checkpoint_dir(ckpt_dir, dtype=getattr(torch, dtype), device=dev)
