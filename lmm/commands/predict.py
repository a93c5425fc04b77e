"""``python -m lmm predict``: answer a LLaVA question file with a checkpoint directory, batched, optionally scored."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from lmm.commands.generation_options import add_generation_options, generation_overrides
from lmm.inference.ordering import gather_in_order
from lmm.inference.predictor import (
    Predictor,
    answer_questions,
    load_for_inference,
    read_questions,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmm predict",
        description="Answer a LLaVA question file (JSONL: question_id, image, text) with an lmm checkpoint "
        "directory and write LLaVA-style answers (JSONL: question_id, prompt, text, answer_id, model_id), "
        "batched. With --benchmark and --annotations the answers are scored too (metrics JSON next to the "
        "answers, optionally TensorBoard scalars); `python -m lmm score` scores any answer file later. "
        "Under torchrun the questions are split over the processes and rank 0 writes them in file order.",
    )
    parser.add_argument(
        "--ckpt", required=True, help="lmm checkpoint directory (see lmm/checkpoints/directory.py)"
    )
    parser.add_argument("--questions", required=True, help="question file (JSON lines)")
    parser.add_argument(
        "--image-folder",
        default=None,
        help="folder the questions' 'image' names are relative to "
        "(default: the question file's folder)",
    )
    parser.add_argument("--answers", required=True, help="answer file to write (JSON lines)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument(
        "--model-id",
        default=None,
        help="model_id written per answer (default: checkpoint folder name)",
    )
    scoring = parser.add_argument_group("scoring (optional)")
    scoring.add_argument(
        "--benchmark",
        default=None,
        help="score the answers as this benchmark "
        "(a `python -m lmm score` name, e.g. pope); writes ANSWERS_STEM.metrics.json",
    )
    scoring.add_argument(
        "--annotations", default=None, help="the benchmark's annotation file or folder"
    )
    scoring.add_argument(
        "--split", default=None, help="subset to score (pope, scienceqa_img), as in lmm score"
    )
    scoring.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write the numeric metrics as TensorBoard scalars to DIR",
    )
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
    from lmm.commands.score import score

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
        from lmm.errors import ConfigError
        from lmm.eval.registry import get_benchmark

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
    from lmm.errors import CheckpointError

    rank, world, device = _init_distributed(args.device)
    try:
        ckpt = load_for_inference(args.ckpt, device, args.dtype)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    predictor = Predictor.from_checkpoint(ckpt, args.batch_size, **generation_overrides(args))
    folder = Path(args.image_folder) if args.image_folder else Path(args.questions).parent
    started = time.perf_counter()
    records = answer_questions(
        predictor,
        questions,
        folder,
        args.model_id or ckpt.name,
        rank,
        world,
        progress=sys.stderr.isatty(),
    )
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
        print(
            f"Wrote {len(records)} answers to {out} ({len(records) / max(took, 1e-9):.1f} questions/s)"
        )
        if failed:
            print(
                f"warning: {len(failed)} question(s) got no answer, e.g. {failed[0]['error']}",
                file=sys.stderr,
            )
        if args.benchmark is not None:
            from lmm.commands.score import InputError

            try:
                score_answers(args, out)
            except InputError as err:
                print(f"error: scoring {out}: {err}", file=sys.stderr)
                status = 2
    if world > 1:
        torch.distributed.destroy_process_group()
    return status
