"""``python -m lmm tiny``: the whole two-stage pipeline on CPU, from nothing to test metrics.

generate the shapes world (if missing) -> build tiny random-init models (if missing)
-> pretrain (plain template, captions) -> finetune (chat template, conversations)
-> test on held-out images (POPE, short answers, CHAIR of captions) -> the same test with
blank images (control).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

from lmm.worlds.shapes.config import CAPTION_STYLES, WorldConfig
from lmm.worlds.shapes.tiny import TINY_WORLD, tiny_corpus

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny"
WORKDIR = Path("artifacts/tiny")  # the tiny configs name paths below this directory


def prepare(workdir: Path = WORKDIR, world: WorldConfig = TINY_WORLD) -> None:
    """Write the world and the tiny models unless they exist."""
    from lmm.standins.tiny import build_tiny_models
    from lmm.worlds.shapes.writer import write_world

    write_world(workdir / "data", world)
    build_tiny_models(workdir / "models", tiny_corpus())


def run_cli(args: list[str]):
    """One LightningCLI run in this process (saves re-importing torch for every stage)."""
    from lmm.train.cli import LMMCLI

    return LMMCLI(args=args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmm tiny",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="override trainer.max_steps of stage 1"
    )
    parser.add_argument(
        "--finetune-steps", type=int, default=None, help="override trainer.max_steps of stage 2"
    )
    parser.add_argument(
        "--train-images", type=int, default=None, help="images in the generated train split"
    )
    parser.add_argument(
        "--caption-style",
        choices=CAPTION_STYLES,
        default=None,
        help=f"captions of the generated world (default {TINY_WORLD.caption_style!r}; see WorldConfig)",
    )
    parser.add_argument(
        "--skip-control", action="store_true", help="skip the blank-image control test"
    )
    args = parser.parse_args(argv)
    # LightningCLI warns when args are given while sys.argv holds `tiny`; that is intended here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    if not (CONFIGS / "pretrain.yaml").exists():
        parser.error(
            f"tiny configs not found at {CONFIGS}; run from a source checkout (pip install -e .)"
        )

    timings: dict[str, float] = {}
    start = time.perf_counter()

    def stage(name: str, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        timings[name] = round(time.perf_counter() - t, 1)
        return out

    world = TINY_WORLD
    if args.train_images is not None:
        world = replace(world, train_images=args.train_images)
    if args.caption_style is not None:
        world = replace(world, caption_style=args.caption_style)
    stage("prepare", prepare, WORKDIR, world)
    pre = ["fit", "--config", str(CONFIGS / "pretrain.yaml")]
    if args.pretrain_steps:
        pre += ["--trainer.max_steps", str(args.pretrain_steps)]
    stage("pretrain", run_cli, pre)
    fin = ["fit", "--config", str(CONFIGS / "finetune.yaml")]
    if args.finetune_steps:
        fin += ["--trainer.max_steps", str(args.finetune_steps)]
    stage("finetune", run_cli, fin)
    test = [
        "test",
        "--config",
        str(CONFIGS / "finetune.yaml"),
        "--model.init_from",
        str(WORKDIR / "finetune.safetensors"),
    ]
    metrics = stage(
        "test", run_cli, test + ["--model.results_dir", str(WORKDIR / "results/test")]
    ).model.test_metrics
    summary = {"test": metrics}
    if not args.skip_control:
        blank = test + [
            "--data.blank_images",
            "true",
            "--model.results_dir",
            str(WORKDIR / "results/blank"),
        ]
        summary["blank_control"] = stage("control", run_cli, blank).model.test_metrics
    timings["total"] = round(time.perf_counter() - start, 1)
    summary["seconds"] = timings
    (WORKDIR / "results").mkdir(parents=True, exist_ok=True)
    (WORKDIR / "results" / "summary.json").write_text(json.dumps(summary, indent=2))
    print(headline(summary))
    return 0


def _chair(m: dict) -> str:
    return (
        f"CHAIR_s {m['chair_s']:.3f}  CHAIR_i {m['chair_i']:.3f}  (object recall {m['recall']:.3f})"
    )


def headline(summary: dict) -> str:
    """The figures the README reports."""
    test = summary["test"]
    lines = ["", "tiny pipeline results (held-out images)"]
    for split in ("pope_random", "pope_popular", "pope_adversarial"):
        m = test[split]
        lines.append(
            f"  {split:<18} F1 {m['f1']:.3f}  acc {m['accuracy']:.3f}  yes-ratio {m['yes_ratio']:.3f}"
        )
    lines.append(f"  short_answer       acc {test['short_answer']['accuracy']:.3f}")
    if "caption" in test:
        lines.append(f"  captions           {_chair(test['caption'])}")
    if "blank_control" in summary:
        b = summary["blank_control"]
        accs = " / ".join(
            f"{b[s]['accuracy']:.3f}" for s in ("pope_random", "pope_popular", "pope_adversarial")
        )
        lines.append(
            f"  blank-image control: POPE acc {accs}, short-answer acc {b['short_answer']['accuracy']:.3f}"
        )
        if "caption" in b:
            lines.append(f"  blank-image captions {_chair(b['caption'])}")
    lines.append(f"  seconds: {summary['seconds']}")
    return "\n".join(lines)
