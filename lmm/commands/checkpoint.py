"""``python -m lmm checkpoint``: write a checkpoint directory from a LightningCLI config and its weights."""

from __future__ import annotations

import argparse
import sys

from lmm.checkpoints.directory import save_checkpoint_dir
from lmm.model.language import LanguageConfig
from lmm.model.towers import VisionConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmm checkpoint",
        description=(
            "Write an lmm checkpoint directory (for chat, predict and export) from a LightningCLI "
            "config and its weights, e.g.\n  python -m lmm checkpoint --config configs/tiny/finetune.yaml "
            "--model.init_from artifacts/tiny/finetune.safetensors --out artifacts/tiny/finetune\n"
            "Every option besides --out is passed to the LightningCLI (as for `python -m lmm test`): the "
            "model section says what to build and which weights to load (model.init_from), the data section "
            "gives the template, system prompt, max_length and prompt conventions (image_placement, "
            "tokenization, image_position)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not rest:
        parser.error("give the model config, e.g. --config configs/tiny/finetune.yaml")
    from lmm.train.cli import LMMCLI

    cli = LMMCLI(args=rest, run=False)
    module, dm = cli.model, cli.datamodule
    hp = module.hparams
    if not hp.get("init_from"):
        print(
            "warning: model.init_from is not set: writing the pretrained parts without trained weights",
            file=sys.stderr,
        )
    out = save_checkpoint_dir(
        module.model,
        args.out,
        vision=VisionConfig(**hp["vision"]),
        llm=LanguageConfig(**hp["llm"]),
        connector=hp["connector"],
        template=dm.template,
        max_length=dm.max_length,
        generation=module.gen_cfg,
        conventions=dm.prompt_conventions(),
    )
    print(f"Wrote lmm checkpoint directory {out}")
    return 0
