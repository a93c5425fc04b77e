"""Format ``llava_onevision_hf``: transformers ``LlavaOnevisionForConditionalGeneration`` folders
(llava-hf/llava-onevision-*, lmm's OneVision exports).

As ``llava_hf`` for the tower, projector and LM, plus what makes OneVision (transformers
``modeling_llava_onevision.py``, ``LlavaOnevisionModel.pack_image_features`` /
``apply_pooling``):

* ``image_grid_pinpoints`` (``[height, width]`` canvases in pixels, in tie-breaking order) ->
  ``model.vision.anyres.grids`` (``[rows, cols]`` of tower-sized crops);
* ``vision_aspect_ratio: anyres_max_N`` -> ``anyres.max_tiles: N`` (shrink when the map
  exceeds N crops' tokens by more than 1.1x per side, as transformers does);
* ``image_newline`` -> lmm's ``connector.image_newline``;
* video: frames pooled bilinearly to ``ceil(side / 2)`` and one newline after the clip
  (``model.vision.video``, pool 2);
* the base view is the image squashed to the tower's square (``image_preprocess: resize``).

Prompts: OneVision's ``qwen_1_5`` (ChatML with "You are a helpful assistant."), ``<image>``
first, lmms-eval's answer suffixes.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from lmm.checkpoints.formats.common import (
    ImportedModel,
    ImportOptions,
    apply_prompting_file,
)
from lmm.checkpoints.formats.llava_hf import load_transformers_model, split_parts
from lmm.errors import ImportFormatError
from lmm.visual.anyres import AnyResConfig
from lmm.visual.video import VideoConfig

# transformers' OneVision pools every video frame by 2 per side (apply_pooling, fixed).
VIDEO_POOL = 2
# The shrink tolerance transformers applies to anyres_max_N (pack_image_features).
SHRINK_TOLERANCE = 1.1


def anyres_from_config(config, src: Path) -> AnyResConfig:
    """``image_grid_pinpoints`` + ``vision_aspect_ratio`` -> lmm's AnyRes settings."""
    tile = config.vision_config.image_size
    grids = []
    for pair in config.image_grid_pinpoints:
        height, width = pair
        if height % tile or width % tile:
            raise ImportFormatError(
                f"{src}: image_grid_pinpoints entry {pair} is not a whole number of {tile}-px crops"
            )
        grids.append((height // tile, width // tile))
    budget = re.fullmatch(r"anyres_max_(\d+)", str(config.vision_aspect_ratio))
    if budget is None:
        raise ImportFormatError(
            f"{src}: vision_aspect_ratio {config.vision_aspect_ratio!r} is not anyres_max_N"
        )
    return AnyResConfig(
        grids=grids, max_tiles=int(budget.group(1)), shrink_tolerance=SHRINK_TOLERANCE
    )


def read(src: Path, options: ImportOptions) -> ImportedModel:
    """A ``LlavaOnevisionForConditionalGeneration`` folder -> parts."""
    from transformers import LlavaOnevisionForConditionalGeneration

    hf = load_transformers_model(LlavaOnevisionForConditionalGeneration, src, "llava_onevision")
    model = split_parts(hf, src, options)
    model.connector_state["image_newline"] = hf.model.image_newline.detach()
    model.vision = replace(
        model.vision,
        image_preprocess="resize",
        anyres=anyres_from_config(hf.config, src),
        video=VideoConfig(pool=VIDEO_POOL),
    )
    if model.template == "chatml":  # OneVision's qwen_1_5 keeps ChatML's default system prompt
        model.system_prompt = None
    model.source["format"] = "llava_onevision_hf"
    apply_prompting_file(model, src)
    return model
