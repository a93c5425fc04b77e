"""Batched answers from a trained model, and ``python -m lmm predict`` over a LLaVA question file.

:class:`Predictor` is the one generation path outside the Trainer: ``predict``, ``chat``, the
lmms-eval adapter and ``benchmarks/eval_throughput.py`` all use it. Prompts are built exactly
as ``lmm test`` builds them (the checkpoint's conversation template, ``<image>`` expanded to
the model's image-token count by :class:`lmm.data.encode.SampleEncoder`), batched with left
padding and decoded with the KV cache.

Question file (JSON lines, as LLaVA's ``model_vqa_loader`` reads them)::

    {"question_id": 17, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?"}

Answer file (JSON lines, as LLaVA writes them; ``lmm score`` and LLaVA's scripts read it)::

    {"question_id": 17, "prompt": "Is there a dog ...", "text": "Yes", "answer_id": "...", "model_id": "finetune", "metadata": {}}

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process answers every n-th question and rank 0
writes all answers in the question file's order.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from PIL import Image

from lmm.data.collate import collate
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.errors import SampleError
from lmm.data.templates import IMAGE_TOKEN, Template
from lmm.model.lmm import LMM, GenerationConfig

# -- ordering across ranks -------------------------------------------------------------------


def sort_by_order(parts: Iterable[list[dict]], key: str = "order") -> list[dict]:
    """Concatenate per-rank record lists and sort them by ``key`` (then drop it).

    Records without a key (None) keep their gathered order after the keyed ones.
    """
    records = [r for part in parts for r in part]
    keyed = [r for r in records if r.get(key) is not None]
    rest = [r for r in records if r.get(key) is None]
    keyed.sort(key=lambda r: tuple(r[key]) if isinstance(r[key], (list, tuple)) else (r[key],))
    return [{k: v for k, v in r.items() if k != key} for r in keyed + rest]


def gather_in_order(records: list[dict], key: str = "order") -> list[dict]:
    """All ranks' records, in their original order (every rank gets the full list)."""
    parts: list[Any] = [records]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, records)
    return sort_by_order(parts, key)


# -- prompts and generation ----------------------------------------------------------------------


def stop_token_ids(tokenizer, template: Template) -> list[int]:
    """The template's end-of-turn token id (besides eos), e.g. ``<|im_end|>`` for ChatML.

    The template is bound to ``tokenizer`` here (binding a bound template is harmless), since
    only a bound ``tokenizer`` template knows its end-of-turn (e.g. Gemma-it's ``<end_of_turn>``);
    unbound it would give eos alone."""
    stop = template.bind(tokenizer).stop_string(tokenizer.eos_token)
    if stop and stop != tokenizer.eos_token and stop in tokenizer.get_vocab():
        return [tokenizer.convert_tokens_to_ids(stop)]
    return []


def user_turn(text: str, n_images: int) -> str:
    """LLaVA's convention: ``<image>\\n`` before the question unless the text places it."""
    if n_images and IMAGE_TOKEN not in text:
        return (IMAGE_TOKEN + "\n") * n_images + text
    return text


class Predictor:
    """Answers conversations about images with a model and a conversation template.

    Args:
        model: The model (in eval mode, on its device).
        template: Conversation template the model was trained with.
        generation: Default decoding settings.
        max_length: Longest prompt in tokens (after ``<image>`` expansion).
        batch_size: Prompts per generation batch.
    """

    def __init__(
        self,
        model: LMM,
        template: Template,
        generation: GenerationConfig = GenerationConfig(),
        max_length: int = 2048,
        batch_size: int = 16,
    ) -> None:
        self.model = model
        self.generation = generation
        self.batch_size = batch_size
        tok = model.tokenizer
        processor = Processor(tok, model.vision.image_spec, model.num_image_tokens, model.image_token_id, model.image_layout)
        self.encoder = SampleEncoder(processor, template, max_length)
        self.template = self.encoder.template  # bound to the tokenizer
        self.stop_ids = stop_token_ids(tok, self.template)

    @classmethod
    def from_checkpoint(cls, ckpt, batch_size: int = 16, **generation: Any) -> "Predictor":
        """From a loaded :class:`lmm.checkpoint_dir.Checkpoint`; ``generation`` overrides its defaults."""
        gen = replace(ckpt.generation, **{k: v for k, v in generation.items() if v is not None})
        return cls(ckpt.model, ckpt.template, gen, ckpt.max_length, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, conversations: list[dict], images: Sequence[Image.Image], sample_id: str = "prompt") -> dict:
        """LLaVA-schema turns ending with a user turn (+ its images) -> prompt sample.

        Raises :class:`lmm.data.errors.SampleError` (``overlong``, ``image_count``, ``malformed``).
        """
        return self.encoder.encode_prompt({"id": sample_id, "conversations": conversations}, list(images))

    def encode_question(self, text: str, images: Sequence[Image.Image], sample_id: str = "prompt") -> dict:
        """A single question (LLaVA's ``<image>\\n`` placement) -> prompt sample."""
        return self.encode([{"from": "human", "value": user_turn(text, len(images))}], images, sample_id)

    @torch.no_grad()
    def generate(self, samples: list[dict], generation: Optional[GenerationConfig] = None) -> list[str]:
        """Answers for encoded prompts (one generation batch; order kept)."""
        if not samples:
            return []
        g = generation or self.generation
        batch = collate(samples, pad_id=self.model.tokenizer.pad_token_id, left=True)
        dev = self.device
        return self.model.generate_text(
            batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["pixel_values"].to(dev),
            stop_token_ids=self.stop_ids, **g.kwargs(),
        )

    def generate_all(
        self, samples: list[dict], generation: Optional[GenerationConfig] = None, batch_size: Optional[int] = None
    ) -> list[str]:
        """Answers for any number of prompts, in their order.

        Prompts are batched by length (longest first), which keeps padding low; under greedy
        decoding the answers do not depend on the batching (tests check this).
        """
        n = batch_size or self.batch_size
        by_length = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
        answers: list[str] = [""] * len(samples)
        for start in range(0, len(by_length), n):
            idx = by_length[start : start + n]
            for i, text in zip(idx, self.generate([samples[i] for i in idx], generation)):
                answers[i] = text
        return answers


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
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); expected one question object per line") from None
            if not isinstance(q, dict) or "question_id" not in q or not isinstance(q.get("text"), str):
                raise ValueError(f"{path}:{number}: expected an object with 'question_id' and a string 'text'")
            questions.append(q)
    return questions


def _load_image(folder: Path, name: str) -> Image.Image:
    path = folder / name
    if not path.is_file():
        raise SampleError("image_decode", f"image {str(path)!r} does not exist (check --image-folder)")
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
) -> list[dict]:
    """LLaVA-style answer records for this rank's share of ``questions`` (tagged with ``order``).

    A question that cannot be answered (missing image, prompt over max_length) gets an empty
    answer and an ``error`` field instead of stopping the run.
    """
    mine = list(range(rank, len(questions), world_size))
    records: list[dict] = []
    step = predictor.batch_size * 8  # decode images a chunk at a time, not all at once
    started = time.perf_counter()
    for start in range(0, len(mine), step):
        chunk = mine[start : start + step]
        samples, ok, errors = [], [], {}
        for i in chunk:
            q = questions[i]
            try:
                images = [_load_image(image_folder, q["image"])] if q.get("image") else []
                samples.append(predictor.encode_question(q["text"], images, str(q["question_id"])))
                ok.append(i)
            except SampleError as err:
                errors[i] = str(err)
        answers = dict(zip(ok, predictor.generate_all(samples)))
        for i in chunk:
            q = questions[i]
            rec = {
                "order": i,
                "question_id": q["question_id"],
                "prompt": q["text"],
                "text": answers.get(i, ""),
                "answer_id": uuid.uuid4().hex[:22],
                "model_id": model_id,
                "metadata": {},
            }
            if i in errors:
                rec["error"] = errors[i]
            records.append(rec)
        if progress:
            done = start + len(chunk)
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"[rank {rank}] {done}/{len(mine)} questions ({rate:.1f}/s)", file=sys.stderr, flush=True)
    return records


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Decoding and placement options shared by ``predict`` and ``chat``."""
    g = parser.add_argument_group("decoding (defaults: the checkpoint's generation settings)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="longest answer in tokens")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; > 0 turns sampling on, 0 means greedy (as LLaVA's scripts)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible sampled answers)")
    p = parser.add_argument_group("placement")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights dtype (bfloat16 halves GPU memory; float32 on CPU)")


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line decoding options -> GenerationConfig fields (unset ones left out)."""
    out: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "top_p": args.top_p, "seed": args.seed}
    if args.temperature is not None:
        out["do_sample"] = args.temperature > 0
        if args.temperature > 0:
            out["temperature"] = args.temperature
    return {k: v for k, v in out.items() if v is not None}


def load_for_inference(ckpt_dir: str, device: Optional[str], dtype: str):
    """Load a checkpoint directory onto ``device`` (default: cuda if available)."""
    from lmm.checkpoint_dir import load_checkpoint_dir

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_checkpoint_dir(ckpt_dir, dtype=getattr(torch, dtype), device=dev)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmm predict",
        description="Answer a LLaVA question file (JSONL: question_id, image, text) with an lmm checkpoint "
        "directory and write LLaVA-style answers (JSONL: question_id, prompt, text, answer_id, model_id), "
        "batched. With --benchmark and --annotations the answers are scored too (metrics JSON next to the "
        "answers, optionally TensorBoard scalars); `python -m lmm score` scores any answer file later. "
        "Under torchrun the questions are split over the processes and rank 0 writes them in file order.",
    )
    parser.add_argument("--ckpt", required=True, help="lmm checkpoint directory (see lmm/checkpoint_dir.py)")
    parser.add_argument("--questions", required=True, help="question file (JSON lines)")
    parser.add_argument("--image-folder", default=None, help="folder the questions' 'image' names are relative to "
                        "(default: the question file's folder)")
    parser.add_argument("--answers", required=True, help="answer file to write (JSON lines)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--model-id", default=None, help="model_id written per answer (default: checkpoint folder name)")
    scoring = parser.add_argument_group("scoring (optional)")
    scoring.add_argument("--benchmark", default=None, help="score the answers as this benchmark "
                         "(a `python -m lmm score` name, e.g. pope); writes ANSWERS_STEM.metrics.json")
    scoring.add_argument("--annotations", default=None, help="the benchmark's annotation file or folder")
    scoring.add_argument("--split", default=None, help="subset to score (pope, scienceqa_img), as in lmm score")
    scoring.add_argument("--tensorboard", default=None, metavar="DIR",
                         help="also write the numeric metrics as TensorBoard scalars to DIR")
    add_generation_options(parser)
    return parser


def flat_scalars(metrics: dict, prefix: str) -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``prefix/a/b`` -> value (TensorBoard tags)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def score_answers(args: argparse.Namespace, answers: Path) -> dict:
    """Score the written answer file; write metrics JSON (and TensorBoard scalars)."""
    from lmm.eval.score import score

    metrics, _ = score(args.benchmark, args.annotations, answers, split=args.split)
    path = answers.with_name(answers.stem + ".metrics.json")
    path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.tensorboard) as writer:
            for tag, value in flat_scalars(metrics, args.benchmark).items():
                writer.add_scalar(tag, value, 0)
    print(json.dumps(metrics))
    return metrics


def _init_distributed(device: Optional[str]) -> tuple[int, int, Optional[str]]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return torch.distributed.get_rank(), world, device or "cpu"


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if (args.benchmark is None) != (args.annotations is None):
        parser.error("--benchmark and --annotations go together")
    if args.benchmark is not None:  # fail before generating, not after
        from lmm.eval.registry import get_benchmark
        from lmm.registry import ConfigError

        try:
            get_benchmark(args.benchmark)
        except ConfigError as err:
            print(f"error: --benchmark: {err}", file=sys.stderr)
            return 2
    try:
        questions = read_questions(args.questions)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lmm.checkpoint_dir import CheckpointError

    rank, world, device = _init_distributed(args.device)
    try:
        ckpt = load_for_inference(args.ckpt, device, args.dtype)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    predictor = Predictor.from_checkpoint(ckpt, args.batch_size, **generation_overrides(args))
    folder = Path(args.image_folder) if args.image_folder else Path(args.questions).parent
    started = time.perf_counter()
    records = answer_questions(predictor, questions, folder, args.model_id or ckpt.name, rank, world,
                               progress=sys.stderr.isatty())
    records = gather_in_order(records)
    status = 0
    if rank == 0:
        out = Path(args.answers)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        failed = [r for r in records if "error" in r]
        took = time.perf_counter() - started
        print(f"Wrote {len(records)} answers to {out} ({len(records) / max(took, 1e-9):.1f} questions/s)")
        if failed:
            print(f"warning: {len(failed)} question(s) got no answer, e.g. {failed[0]['error']}", file=sys.stderr)
        if args.benchmark is not None:
            from lmm.eval.score import InputError

            try:
                score_answers(args, out)
            except InputError as err:
                print(f"error: scoring {out}: {err}", file=sys.stderr)
                status = 2
    if world > 1:
        torch.distributed.destroy_process_group()
    return status
