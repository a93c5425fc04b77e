"""``benchmarks/recipe_samples.py`` prints, per recipe stage, the image token count and padding
the references give: TinyLLaVA_Factory drops the first token for every tower
(``tinyllava/model/vision_tower/base.py``, ``VisionTower.forward``, strategy "patch"):
(384 / 14)^2 - 1 = 728 for SigLIP, (336 / 14)^2 = 576 for CLIP (its CLS is the token dropped);
LLaVA-1.5's ``pad`` fills with ``int(mean * 255)`` of CLIP's mean; LLaVA-OneVision keeps all
729 SigLIP tokens and counts AnyRes images as transformers' ``LlavaOnevisionProcessor`` does.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "recipe_samples.py"
_spec = importlib.util.spec_from_file_location("recipe_samples", _PATH)
samples = importlib.util.module_from_spec(_spec)
sys.modules["recipe_samples"] = samples  # dataclasses look their module up
_spec.loader.exec_module(samples)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def _onevision_count(width: int, height: int) -> int:
    """transformers' own count (``LlavaOnevisionProcessor._get_number_of_features``) for one
    image at 384 px, 27x27 tokens per view, ``anyres_max_9`` over grids up to 6x6."""
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor as P,
    )

    pins = [[r * 384, c * 384] for r in range(1, 7) for c in range(1, 7)]
    ns = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pins),
        num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9",
    )
    ns._get_unpadded_features = functools.partial(P._get_unpadded_features, ns)
    return P._get_number_of_features(ns, height, width, 384, 384)


def _printed(capsys, *argv: str) -> list[dict]:
    assert samples.main(list(argv)) == 0
    blocks = capsys.readouterr().out.split("== ")[1:]
    out = []
    for block in blocks:
        out.append(
            {
                "title": block.splitlines()[0],
                "tokens": int(re.search(r"image tokens: (\d+)", block).group(1)),
                "views": re.search(r"views: ([\d x]+)", block).group(1).strip(),
                "padding": re.search(r"padding colour: (.*)", block).group(1),
                "text": block.splitlines()[-1],
            }
        )
    return out


@pytest.mark.parametrize(
    "pair,tokens,side", [("SigLIP-Phi-2", 27 * 27 - 1, 384), ("CLIP-StableLM-2", 24 * 24, 336)]
)
def test_tinyllava_pairs(capsys, pair, tokens, side):
    printed = _printed(capsys, "--recipe", "tinyllava/base", "--pair", pair)
    assert [p["title"] for p in printed] == [
        f"tinyllava/base pretrain + {pair}",
        f"tinyllava/base finetune + {pair}",
    ]
    for p in printed:
        assert p["tokens"] == tokens and p["views"] == f"1 x 3 x {side} x {side}"
        assert p["padding"] == "none"  # --image_aspect_ratio square: nothing is padded
        assert p["text"].count("<image>x") == 1 and "[[" in p["text"]


def test_llava_1_5_pads_its_finetuning_images_with_the_truncated_mean(capsys):
    pre, fin = _printed(capsys, "--recipe", "llava/v1_5")
    assert pre["tokens"] == fin["tokens"] == 24 * 24
    assert pre["padding"] == "none"  # pretraining: square (CLIP's centre crop)
    assert fin["padding"] == str([tuple(int(m * 255) for m in CLIP_MEAN)])  # (122, 116, 104)


def test_onevision_counts(capsys):
    pre, fin = _printed(capsys, "--recipe", "onevision")
    assert pre["tokens"] == 729 and pre["padding"] == "none"  # SigLIP squash, every token kept
    assert fin["tokens"] == _onevision_count(*samples.PHOTO_SIZE)
    assert fin["views"].startswith("5 x")  # base view + 2x2 crops
    assert fin["padding"] == "[(0, 0, 0)]"  # the crops' canvas is black


def test_overrides_after_the_double_dash_reach_every_stage(capsys):
    (fin,) = _printed(
        capsys, "--recipe", "onevision", "--stage", "finetune", "--",
        "--model.vision.anyres.crop_fill", "mean",
    )  # fmt: skip
    assert fin["padding"] == "[(127, 127, 127)]"  # int(0.5 * 255): SigLIP's mean colour
