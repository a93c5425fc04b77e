"""One encoded training sample per recipe stage, as the stage's own data pipeline builds it.

For each recipe (TinyLLaVA base/share x every tower + LLM pair file, LLaVA v1, LLaVA-1.5,
LLaVA-OneVision) and stage, the stage file is parsed by the real CLI with the hub models
swapped for stand-ins of the same classes (``lmm.standins``: towers at their real input and
patch size with the hub's ``preprocessor_config.json``, so token counts and pixels are the real
ones; tiny random LLMs with a tokenizer of the family's kind). The stage's encoder then turns a
LLaVA-style sample (a 640x427 photo, the question written before ``<image>`` as in
LLaVA-Instruct) into ids, labels and pixels, and this prints:

- the ids decoded, ``<image>`` runs shown as ``<image>xN`` and supervised spans in ``[[ ]]``;
- the image token count per ``<image>`` and the tower inputs (views) behind it;
- pixel statistics: per-channel mean / std of the tower inputs in 8-bit units, their size, and
  the padding colour found on any view's border (``none`` when nothing is padded).

    python benchmarks/recipe_samples.py                          # every recipe, every stage
    python benchmarks/recipe_samples.py --recipe llava/v1_5
    python benchmarks/recipe_samples.py --recipe tinyllava/base --pair SigLIP-Phi-2 --stage finetune
    python benchmarks/recipe_samples.py --recipe onevision -- --data.max_length 4096   # any CLI override

The printed counts are what ``tests/test_recipe_samples.py`` checks against the references'
formulas (728 / 576 / 256 / 729, OneVision's AnyRes count).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PHOTO_SIZE = (640, 427)  # a typical COCO photo: landscape, so padding shows
PAIRS = [p.stem for p in sorted((CONFIGS / "tinyllava" / "models").glob("*.yaml"))]


@dataclass(frozen=True)
class Recipe:
    """Stage files under ``configs/<name>/`` (or ``configs/`` for one-level names), and whether
    a ``configs/tinyllava/models/<pair>.yaml`` completes them."""

    name: str
    stages: tuple[str, ...] = ("pretrain", "finetune")
    paired: bool = False

    def stage_file(self, stage: str) -> Path:
        return CONFIGS / self.name / f"{stage}.yaml"


RECIPES = {
    r.name: r
    for r in (
        Recipe("tinyllava/base", paired=True),
        Recipe("tinyllava/share", paired=True),
        Recipe("llava/v1"),
        Recipe("llava/v1_5"),
        Recipe("onevision"),
    )
}

CAPTION_SAMPLE = [
    {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
    {"from": "gpt", "value": "a red kite flying over a sandy beach at sunset"},
]
CHAT_SAMPLE = [
    {"from": "human", "value": "What is the man holding?\n<image>"},
    {"from": "gpt", "value": "He is holding a red kite."},
    {"from": "human", "value": "Is it windy?"},
    {"from": "gpt", "value": "Yes, the kite is high in the air."},
]


class StandIns:
    """Hub name -> a stand-in directory, each built once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        from lmm.standins.llm import build_llm, family_of
        from lmm.standins.vision import HUB_TOWERS, build_hub_tower

        if name not in self._built:
            if name in HUB_TOWERS:
                self._built[name] = build_hub_tower(name, self.root / "towers").name_or_path
            else:
                family = family_of(name)
                self._built[name] = str(build_llm(family, self.root / "llms" / family))
        return self._built[name]


def _stage_cli(
    recipe: Recipe,
    stage: str,
    pair: Optional[str],
    standins: StandIns,
    out: Path,
    overrides: Sequence[str] = (),
):
    """The CLI of ``stage`` (+ ``pair``, + ``overrides``) with stand-ins, parsed and
    instantiated, not run."""
    import yaml

    from lmm.train.cli import LMMCLI

    files = [recipe.stage_file(stage)]
    if pair:
        files.append(CONFIGS / "tinyllava" / "models" / f"{pair}.yaml")
    vision: dict = {}
    llm: dict = {}
    for f in files:  # what the files say (the later file wins, as in the CLI)
        model = yaml.safe_load(f.read_text()).get("model") or {}
        vision.update(model.get("vision") or {})
        llm.update(model.get("llm") or {})
    if vision.get("kind") == "fused":  # each tower of a fused tower gets its stand-in
        towers = [
            {**t, "name_or_path": standins(t["name_or_path"])} for t in vision["fused"]["towers"]
        ]
        swap = ["--model.vision.fused.towers", json.dumps(towers)]
    else:
        swap = ["--model.vision.name_or_path", standins(vision["name_or_path"])]
    args = [a for f in files for a in ("--config", str(f))]
    args += [
        *swap, "--model.llm.name_or_path", standins(llm["name_or_path"]),
        "--model.init_from", "null",  # the previous stage's weights: not needed to encode
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(out), *overrides,
    ]  # fmt: skip
    return LMMCLI(args=args, run=False)


def _raw_sample(conversations: list[dict]) -> dict:
    from lmm.standins.photo import photo

    buf = io.BytesIO()
    photo(*PHOTO_SIZE, seed=7).save(buf, "JPEG", quality=95)
    meta = {"id": "recipe-sample", "image": "photo.jpg", "conversations": conversations}
    return {
        "__key__": "recipe-sample",
        "json": json.dumps(meta).encode(),
        "000.jpg": buf.getvalue(),
    }


def _decoded(ids: torch.Tensor, labels: torch.Tensor, tokenizer, image_id: int) -> str:
    """The sample's text, ``<image>`` runs as ``<image>xN``, supervised runs in ``[[ ]]`` and
    newlines shown as ``\\n``. Each run's text is the growth of the decoded prefix, so a space
    carried by a run's first token (SentencePiece's ``▁``) shows where it is."""
    runs: list[tuple[str, int, int]] = []  # (kind, start, end) over the ids
    for i, (t, y) in enumerate(zip(ids.tolist(), labels.tolist())):
        kind = "image" if t == image_id else ("sup" if y != -100 else "prompt")
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1], i + 1)
        else:
            runs.append((kind, i, i + 1))
    out, prefix, done = [], [], ""
    for kind, start, end in runs:
        prefix += [image_id] if kind == "image" else ids[start:end].tolist()
        text = tokenizer.decode(prefix)
        piece, done = text[len(done) :], text
        if kind == "image":
            out.append(f"<image>x{end - start}")
        else:
            piece = piece.replace("\n", "\\n")
            out.append(f"[[{piece}]]" if kind == "sup" else piece)
    return "".join(out)


def _border_colours(views_u8: torch.Tensor) -> list[tuple[int, int, int]]:
    """Colours of view borders (first/last row/column) that are one flat colour: padding."""
    found = []
    for v in views_u8:
        for edge in (v[:, 0, :], v[:, -1, :], v[:, :, 0], v[:, :, -1]):
            if bool((edge == edge[:, :1]).all()):
                colour = tuple(int(c) for c in edge[:, 0])
                if colour not in found:
                    found.append(colour)
    return found


def describe(
    recipe: Recipe,
    stage: str,
    pair: Optional[str],
    standins: StandIns,
    out: Path,
    overrides: Sequence[str] = (),
) -> dict:
    """Encode the recipe's sample for ``stage``; returns what is printed."""
    cli = _stage_cli(recipe, stage, pair, standins, out, overrides)
    dm, model = cli.datamodule, cli.model.model
    encoder = dm._encoder()  # the stage's encoder exactly as its data loaders build it
    conversations = CAPTION_SAMPLE if dm.template.name == "plain" else CHAT_SAMPLE
    sample = encoder.train_sample(_raw_sample(conversations))
    ids, labels, pv = sample["input_ids"], sample["labels"], sample["pixel_values"]
    pixels = pv.pixels if hasattr(pv, "pixels") else pv
    spec = model.vision.image_spec
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    # The first view's channels (a fused tower stacks one normalisation per tower of the same pixels).
    u8 = ((pixels[:, :3] * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    image_tokens = int((ids == model.image_token_id).sum())
    return {
        "recipe": recipe.name,
        "stage": stage,
        "pair": pair,
        "template": dm.template.name,
        "image_placement": dm.image_placement,
        "tokenization": dm.tokenization,
        "preprocess": f"{spec.preprocess} ({spec.mode})",
        "select": _field(cli.model.hparams["vision"], "select"),
        "image_tokens": image_tokens,
        "views": tuple(pixels.shape),
        "pixel_mean": [round(float(c), 1) for c in u8.float().mean(dim=(0, 2, 3))],
        "pixel_std": [round(float(c), 1) for c in u8.float().std(dim=(0, 2, 3))],
        "padding": _border_colours(u8) or "none",
        "text": _decoded(ids, labels, model.tokenizer, model.image_token_id),
    }


def _field(config, name: str):
    """A field of a config given as a dataclass or (as Lightning's hparams keep it) a dict."""
    return config[name] if isinstance(config, dict) else getattr(config, name)


def report(d: dict) -> str:
    title = f"{d['recipe']} {d['stage']}" + (f" + {d['pair']}" if d["pair"] else "")
    return "\n".join(
        [
            f"== {title}",
            f"   template {d['template']}, image_placement {d['image_placement']}, tokenization "
            f"{d['tokenization']}; image_preprocess {d['preprocess']}, select {d['select']}",
            f"   image tokens: {d['image_tokens']}   views: {' x '.join(map(str, d['views']))}",
            f"   pixels (0-255): mean {d['pixel_mean']} std {d['pixel_std']}; padding colour: {d['padding']}",
            f"   {d['text']}",
        ]
    )


def selected(recipes: list[str], pairs: list[str], stages: list[str]) -> Iterator[tuple]:
    for name in recipes:
        recipe = RECIPES[name]
        for pair in pairs if recipe.paired else [None]:
            for stage in recipe.stages:
                if not stages or stage in stages:
                    yield recipe, stage, pair


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to every stage's CLI (e.g. -- --data.max_length 4096).",
    )
    parser.add_argument(
        "--recipe", action="append", choices=list(RECIPES), help="repeatable; default all"
    )
    parser.add_argument(
        "--pair", action="append", choices=PAIRS, help="TinyLLaVA pair; repeatable; default all"
    )
    parser.add_argument(
        "--stage", action="append", choices=["pretrain", "finetune"], help="default both"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:cut]), argv[cut + 1 :]
    import transformers

    transformers.logging.set_verbosity_error()  # load reports of the stand-ins' unused text towers
    saved_argv, sys.argv = (
        sys.argv,
        sys.argv[:1],
    )  # LightningCLI warns about a command line it is not given
    try:
        with tempfile.TemporaryDirectory() as tmp:
            standins = StandIns(Path(tmp) / "standins")
            runs = selected(args.recipe or list(RECIPES), args.pair or PAIRS, args.stage or [])
            for recipe, stage, pair in runs:
                d = describe(recipe, stage, pair, standins, Path(tmp) / "run", overrides)
                print(report(d), flush=True)
    finally:
        sys.argv = saved_argv
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
