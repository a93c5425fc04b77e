"""Entry point: Lightning subcommands (fit/validate/test) plus lmm's own commands.

``predict`` is lmm's own (a question file answered from a checkpoint directory), not
LightningCLI's (which ``LMMCLI`` does not offer): a researcher's predict input is LLaVA's
question JSONL, not a shard set.
"""

from __future__ import annotations

import importlib
import os
import sys

# Lightning Trainer runs (LMMCLI's subcommands): name -> what it does.
LIGHTNING_COMMANDS = {
    "fit": "train a stage: model + data + trainer from YAML recipes (--config FILE)",
    "validate": "one validation pass (answers scored by generation)",
    "test": "score the data.test sets by generation; writes metrics and predictions",
}

# Subcommands that are not Lightning Trainer runs: name -> "module:function(argv)".
EXTRA_COMMANDS = {
    "score": (
        "lmm.commands.score:main",
        "score predictions of any model against a benchmark's annotations",
    ),
    "tiny": (
        "lmm.commands.tiny:main",
        "build the tiny world and models, pretrain, finetune and test on CPU",
    ),
    "chat": (
        "lmm.commands.chat:main",
        "multi-turn chat about an image with a checkpoint directory (--ckpt DIR --image FILE)",
    ),
    "predict": (
        "lmm.commands.predict:main",
        "answer a LLaVA question file (JSONL) with a checkpoint directory, batched",
    ),
    "export": (
        "lmm.commands.export:main",
        "write a checkpoint directory as a Hugging Face LLaVA or LLaVA-OneVision model (--ckpt DIR --out DIR)",
    ),
    "import": (
        "lmm.commands.import_:main",
        "write a released model (llava_hf, llava_onevision_hf, llava, tinyllava) as a checkpoint directory",
    ),
    "checkpoint": (
        "lmm.commands.checkpoint:main",
        "write a checkpoint directory from a config + weights (--config X --out DIR)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_command_line:
        # Every torch.load of this process runs with weights_only=True, whatever its caller
        # passes (transformers' .bin files, timm, open_clip included): nothing is unpickled.
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    if argv and argv[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[argv[0]][0].split(":")
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    if not argv or argv[0] in ("-h", "--help"):
        print("lmm commands (each has --help, e.g. python -m lmm fit --help):")
        docs = {**LIGHTNING_COMMANDS, **{name: doc for name, (_, doc) in EXTRA_COMMANDS.items()}}
        for name, doc in docs.items():
            print(f"  {name:<10} {doc}")
        print()
        print("Options of the Lightning commands (fit, validate, test):")
    from lmm.train.cli import LMMCLI

    LMMCLI(args=None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
