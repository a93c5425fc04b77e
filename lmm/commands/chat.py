"""``python -m lmm chat``: multi-turn chat about an image with a checkpoint directory."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from lmm.commands.generation_options import add_generation_options, generation_overrides
from lmm.inference.chat import HELP, chat_loop, load_image
from lmm.inference.predictor import Predictor, load_for_inference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmm chat",
        description="Chat about an image with an lmm checkpoint directory. Each input line is a user turn; "
        f"answers are printed one per line. {HELP}. Works interactively and with piped input, e.g. "
        "printf 'What color is the circle?\\nHow many shapes are there?\\n' "
        "| python -m lmm chat --ckpt DIR --image x.png",
    )
    parser.add_argument(
        "--ckpt", required=True, help="lmm checkpoint directory (see lmm/checkpoints/directory.py)"
    )
    parser.add_argument(
        "--image", default=None, help="image to talk about (none: text-only conversation)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="longest conversation in tokens (default: the LM's context minus max-new-tokens)",
    )
    add_generation_options(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from lmm.errors import CheckpointError

    try:
        image = load_image(args.image) if args.image else None
        ckpt = load_for_inference(args.ckpt, args.device, args.dtype)
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictor = Predictor.from_checkpoint(ckpt, batch_size=1, **generation_overrides(args))
    context = getattr(ckpt.model.llm.config, "max_position_embeddings", None) or 2048
    predictor.encoder.max_length = args.max_length or max(
        1, context - predictor.generation.max_new_tokens
    )
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"({HELP})", file=sys.stderr)
    chat_loop(
        predictor, image, sys.stdin, sys.stdout, sys.stderr, prompt="USER: " if interactive else ""
    )
    return 0
