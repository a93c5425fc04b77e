"""Command-line decoding and placement options shared by ``predict`` and ``chat``."""

from __future__ import annotations

import argparse
from typing import Any


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Decoding and placement options shared by ``predict`` and ``chat``."""
    g = parser.add_argument_group("decoding (defaults: the checkpoint's generation settings)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="longest answer in tokens")
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature; > 0 turns sampling on, 0 means greedy (as LLaVA's scripts)",
    )
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument(
        "--seed", type=int, default=None, help="sampling seed (reproducible sampled answers)"
    )
    p = parser.add_argument_group("placement")
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights dtype (bfloat16 halves GPU memory; float32 on CPU)",
    )


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line decoding options -> GenerationConfig fields (unset ones left out)."""
    out: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    if args.temperature is not None:
        out["do_sample"] = args.temperature > 0
        if args.temperature > 0:
            out["temperature"] = args.temperature
    return {k: v for k, v in out.items() if v is not None}
