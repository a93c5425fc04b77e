"""``python -m lmm export``: write a checkpoint directory as a Hugging Face LLaVA model."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from lmm.checkpoints.directory import load_checkpoint_dir
from lmm.checkpoints.hf_export import export_llava
from lmm.errors import CheckpointError, ExportError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmm export",
        description="Write an lmm checkpoint directory as a Hugging Face LLaVA model (config, safetensors "
        "weights, tokenizer with <image>, image processor, chat template) that "
        "LlavaForConditionalGeneration.from_pretrained and AutoProcessor load. Fits models with a "
        "transformers CLIP/SigLIP tower (model.vision.kind hf) and an mlp2x_gelu or linear connector; "
        "other parts stop with an error naming the part.",
    )
    parser.add_argument(
        "--ckpt", required=True, help="lmm checkpoint directory (see lmm/checkpoints/directory.py)"
    )
    parser.add_argument("--out", required=True, help="output directory for the Hugging Face model")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the written weights (default: as trained)",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ckpt = load_checkpoint_dir(args.ckpt)
        out = export_llava(ckpt, args.out, getattr(torch, args.dtype) if args.dtype else None)
    except (CheckpointError, ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"Wrote Hugging Face LLaVA model to {out} (LlavaForConditionalGeneration.from_pretrained({str(out)!r}))"
    )
    return 0
