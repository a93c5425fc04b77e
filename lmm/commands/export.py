"""``python -m lmm export``: write a checkpoint directory as a Hugging Face LLaVA or LLaVA-OneVision model."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from lmm.checkpoints.directory import load_checkpoint_dir
from lmm.checkpoints.hf_export import EXPORT_FORMATS, default_export_format
from lmm.errors import CheckpointError, ExportError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmm export",
        description="Write an lmm checkpoint directory as a Hugging Face model (config, safetensors weights in "
        "the llava-hf layout transformers 4.x and 5.x read, tokenizer with <image>, image processor, chat "
        "template) that LlavaForConditionalGeneration / LlavaOnevisionForConditionalGeneration.from_pretrained "
        "and AutoProcessor load. Fits models with a transformers CLIP/SigLIP tower (model.vision.kind hf) and "
        "an mlp2x_gelu or linear connector; other parts stop with an error naming the part.",
    )
    parser.add_argument(
        "--ckpt", required=True, help="lmm checkpoint directory (see lmm/checkpoints/directory.py)"
    )
    parser.add_argument("--out", required=True, help="output directory for the Hugging Face model")
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS.names(),
        default=None,
        help="llava_hf (one view per image) or llava_onevision_hf (AnyRes, video); default: "
        "llava_onevision_hf for a model with model.vision.anyres/video, else llava_hf",
    )
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
        fmt = args.format or default_export_format(ckpt)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        out = EXPORT_FORMATS.get(fmt, option="--format")(ckpt, args.out, dtype)
    except (CheckpointError, ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cls = (
        "LlavaForConditionalGeneration"
        if fmt == "llava_hf"
        else "LlavaOnevisionForConditionalGeneration"
    )
    print(f"Wrote {fmt} model to {out} ({cls}.from_pretrained({str(out)!r}))")
    return 0
