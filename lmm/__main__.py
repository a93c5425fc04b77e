"""Entry point: Lightning subcommands plus lmm's own (``score``, ``tiny``)."""
from __future__ import annotations

import importlib
import sys

# Subcommands that are not Lightning Trainer runs: name -> "module:function(argv)".
EXTRA_COMMANDS = {
    "score": ("lmm.eval.score:main", "score predictions of any model against a benchmark's annotations"),
    "tiny": ("lmm.pipeline:main", "build the tiny world and models, pretrain, finetune and test on CPU"),
}


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[argv[0]][0].split(":")
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    if not argv or argv[0] in ("-h", "--help"):
        print("lmm commands besides fit/validate/test/predict:")
        for name, (_, doc) in EXTRA_COMMANDS.items():
            print(f"  {name:<8} {doc}")
        print()
    from lmm.cli import LMMCLI

    LMMCLI(args=None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
