"""CLI: generate the synthetic shapes world as WebDataset shards.

Example::

    python -m data_prep.shapes_world --out data/shapes_world --train-images 12000 --seed 0

All generation logic lives in :mod:`lmm.worlds.shapes.world`; this module only maps
command-line options onto :class:`~lmm.worlds.shapes.world.WorldConfig`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from lmm.worlds.shapes.config import CAPTION_STYLES, WorldConfig
from lmm.worlds.shapes.writer import write_world

_DEFAULTS = WorldConfig()


def build_parser() -> argparse.ArgumentParser:
    """Argument parser; defaults come from WorldConfig so there is a single source of truth."""
    p = argparse.ArgumentParser(
        prog="python -m data_prep.shapes_world",
        description="Generate the deterministic synthetic shapes world (pretrain/finetune/val/test WebDataset shards).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out", required=True, help="output directory (manifest.json + one folder per split)"
    )
    p.add_argument(
        "--train-images", type=int, default=_DEFAULTS.train_images, help="number of training images"
    )
    p.add_argument(
        "--val-images", type=int, default=_DEFAULTS.val_images, help="number of validation images"
    )
    p.add_argument(
        "--test-images",
        type=int,
        default=_DEFAULTS.test_images,
        help="number of held-out test images",
    )
    p.add_argument(
        "--caption-test-images",
        type=int,
        default=_DEFAULTS.caption_test_images,
        help="test images that also get a describe prompt in test/caption (scored by CHAIR)",
    )
    p.add_argument(
        "--seed", type=int, default=_DEFAULTS.seed, help="root seed of all random streams"
    )
    p.add_argument(
        "--image-size", type=int, default=_DEFAULTS.image_size, help="image side in pixels"
    )
    p.add_argument(
        "--grid", type=int, default=_DEFAULTS.grid, help="cells per side (only 3 is supported)"
    )
    p.add_argument(
        "--min-objects", type=int, default=_DEFAULTS.min_objects, help="minimum objects per image"
    )
    p.add_argument(
        "--max-objects", type=int, default=_DEFAULTS.max_objects, help="maximum objects per image"
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=_DEFAULTS.samples_per_shard,
        help="max samples per pretrain/finetune shard",
    )
    p.add_argument(
        "--eval-samples-per-shard",
        type=int,
        default=_DEFAULTS.eval_samples_per_shard,
        help="max samples per val/test shard",
    )
    p.add_argument(
        "--describe-prob",
        type=float,
        default=_DEFAULTS.describe_prob,
        help="probability that a finetune conversation gets a 'Describe the image.' turn",
    )
    p.add_argument(
        "--turns-per-sample",
        type=int,
        default=_DEFAULTS.turns_per_sample,
        help="split each finetune conversation into samples of at most this many turns (0 = whole conversations)",
    )
    p.add_argument(
        "--balanced-exist",
        action="store_true",
        help="existence questions in Yes/No pairs per image, rare kinds drawn more often "
        "(see WorldConfig.balanced_exist)",
    )
    p.add_argument(
        "--caption-style",
        choices=CAPTION_STYLES,
        default=_DEFAULTS.caption_style,
        help="objects: list the objects in row-major order; grid: name every cell, vacant ones as 'empty'; "
        "kinds: the objects grouped by shape kind (python -m lmm tiny uses kinds)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: all cores); output does not depend on it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="regenerate even if a manifest with the same config exists",
    )
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, write the world and print a per-split summary."""
    args = build_parser().parse_args(argv)
    try:
        cfg = WorldConfig(
            image_size=args.image_size,
            grid=args.grid,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            train_images=args.train_images,
            val_images=args.val_images,
            test_images=args.test_images,
            caption_test_images=args.caption_test_images,
            samples_per_shard=args.samples_per_shard,
            eval_samples_per_shard=args.eval_samples_per_shard,
            describe_prob=args.describe_prob,
            turns_per_sample=args.turns_per_sample,
            balanced_exist=args.balanced_exist,
            caption_style=args.caption_style,
            seed=args.seed,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    manifest = write_world(
        args.out,
        cfg,
        overwrite=args.overwrite,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    summary = {
        name: {k: split[k] for k in ("num_images", "num_samples")}
        | {"shards": len(split["shards"])}
        for name, split in manifest["splits"].items()
    }
    print(json.dumps(summary, indent=2))
    print(f"world ready at {args.out} ({elapsed:.1f}s; reused if the config was unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
