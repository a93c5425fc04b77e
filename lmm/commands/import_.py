"""``python -m lmm import --from FORMAT SRC --out DIR``: a released model as an lmm checkpoint directory."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import yaml

from lmm.checkpoints.directory import fit_config
from lmm.checkpoints.formats import IMPORT_FORMATS, ImportOptions, import_checkpoint
from lmm.data.encode import IMAGE_PLACEMENTS, TOKENIZATIONS
from lmm.data.prompts import IMAGE_POSITIONS
from lmm.errors import CheckpointError, ConfigError, ImportFormatError, MissingWeightsError


def build_parser() -> argparse.ArgumentParser:
    formats = "\n".join(f"  {n:<20} {IMPORT_FORMATS.get(n).description}" for n in IMPORT_FORMATS)
    parser = argparse.ArgumentParser(
        prog="python -m lmm import",
        description="Write a released model (its files only: configs are read as data, no code from the "
        "source runs) as an lmm checkpoint directory that predict, chat, test, fit and export take, with the "
        f"prompt conventions the reference uses.\nformats:\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", help="folder of the released model (download it first, e.g. `hf download ORG/NAME`)"
    )
    parser.add_argument(
        "--from",
        dest="fmt",
        required=True,
        choices=IMPORT_FORMATS.names(),
        help="the source's format",
    )
    parser.add_argument(
        "--out", required=True, help="lmm checkpoint directory to write (replaced if it exists)"
    )
    parser.add_argument(
        "--vision-tower",
        default=None,
        help="folder of the vision tower (llava: mm_vision_tower, e.g. openai/clip-vit-large-patch14-336; "
        "tinyllava: its image processor)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="folder of the tokenizer, when SRC has none"
    )
    parser.add_argument("--template", default=None, help="data.template (default: the reference's)")
    parser.add_argument(
        "--system-prompt", default=None, help="system prompt (default: the reference's)"
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="token budget (default: the reference's)"
    )
    parser.add_argument(
        "--image-placement", choices=IMAGE_PLACEMENTS, default=None, help="override the reference's"
    )
    parser.add_argument(
        "--tokenization", choices=TOKENIZATIONS, default=None, help="override the reference's"
    )
    parser.add_argument(
        "--image-position", choices=IMAGE_POSITIONS, default=None, help="override the reference's"
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    options = ImportOptions(
        vision_tower=args.vision_tower,
        tokenizer=args.tokenizer,
        template=args.template,
        system_prompt=args.system_prompt,
        max_length=args.max_length,
        image_placement=args.image_placement,
        tokenization=args.tokenization,
        image_position=args.image_position,
    )
    try:
        out, notes = import_checkpoint(args.fmt, args.src, args.out, options)
    except (ImportFormatError, ConfigError, CheckpointError, MissingWeightsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"Wrote lmm checkpoint directory {out} (python -m lmm chat --ckpt {out} --image X.png)")
    print(
        "To fine-tune or test it, start from these config sections (freeze, optim and data.train are yours):"
    )
    print(yaml.safe_dump(fit_config(out), sort_keys=False), end="")
    return 0
