"""Format ``tinyllava``: TinyLLaVA_Factory checkpoints (``TinyLlavaForConditionalGeneration``,
e.g. tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B, and the Factory's finetune output folders).

Facts read from TinyLLaVA/TinyLLaVA_Factory (``tinyllava/model/configuration_tinyllava.py``,
``modeling_tinyllava.py``, ``vision_tower/base.py``, ``connector/mlp.py``,
``data/template/*.py``), never its code (the hub repos ship their own modeling code; it is
not run):

* ``config.json``: ``text_config`` / ``vision_config`` (full transformers configs as dicts),
  ``connector_type`` (``linear``, ``mlp{N}x_gelu``), ``vision_feature_layer`` (default -2),
  ``vision_feature_select_strategy`` (``patch`` drops the first token, also on SigLIP;
  ``cls_patch`` keeps all), ``image_aspect_ratio`` (``square``: the tower's processor; ``pad``),
  ``tokenizer_model_max_length``, ``tokenizer_name_or_path``, ``vision_model_name_or_path``.
* weights: ``language_model.*`` (the LM's own keys), ``vision_tower._vision_tower.*`` (with or
  without the ``vision_model.`` of transformers 4.x), ``connector._connector.{0,2}.*``
  (``mlp2x_gelu``) or ``connector._connector.*`` (``linear``).
* tokenizer: the Factory loads it from ``tokenizer_name_or_path`` (the LM's hub name), but its
  hub repos and output folders hold the files, so SRC's are used (``--tokenizer`` overrides);
  the image processor comes from SRC's ``preprocessor_config.json`` when present, else
  ``--vision-tower`` (``vision_model_name_or_path``), else the tower type's defaults.
* template: not in the config (a training argument); by LM family as the Factory's scripts use
  them (Phi-2 and StableLM-2: ``phi``, TinyLlama: ``llama`` = lmm ``vicuna``, Gemma, Qwen2).
"""

from __future__ import annotations

from pathlib import Path

from lmm.checkpoints.formats.common import (
    ImportedModel,
    ImportOptions,
    load_tokenizer_from,
    read_json,
    read_tensors,
    sequential_projector,
    square_preprocess,
    take,
    vision_config_from,
)
from lmm.checkpoints.formats.llava_hf import REFERENCE_CONVENTIONS
from lmm.data.templates import VICUNA_SYSTEM
from lmm.errors import ImportFormatError
from lmm.model.towers import VisionConfig

# LM family (text model_type) -> lmm template, as the Factory's scripts pair them.
TEMPLATES = {
    "phi": "phi",
    "stablelm": "phi",
    "llama": "vicuna",
    "gemma": "gemma",
    "qwen2": "qwen2_base",
}
_SELECT = {"patch": "patch", "cls_patch": "full"}


def _image_processor(src: Path, options: ImportOptions, notes: list[str]) -> dict | None:
    for folder in (src, Path(options.vision_tower) if options.vision_tower else None):
        if folder is not None and (folder / "preprocessor_config.json").is_file():
            return read_json(folder / "preprocessor_config.json")
    notes.append(
        "no preprocessor_config.json in SRC or --vision-tower: the tower type's default mean/std are used"
    )
    return None


def read(src: Path, options: ImportOptions) -> ImportedModel:
    """A TinyLLaVA_Factory checkpoint folder -> parts."""
    from transformers import AutoConfig

    config_file = src / "config.json"
    cfg = read_json(config_file, "the checkpoint's config")
    if cfg.get("model_type") != "tinyllava":
        raise ImportFormatError(
            f"{config_file}: model_type is {cfg.get('model_type')!r}, expected 'tinyllava'"
        )
    for key in ("text_config", "vision_config", "connector_type"):
        if not cfg.get(key):
            raise ImportFormatError(f"{config_file}: {key!r} is missing")
    text = dict(cfg["text_config"])
    family = text.pop("model_type", None)
    text_config = AutoConfig.for_model(family, **text)
    vision_config = vision_config_from(dict(cfg["vision_config"]))
    strategy = cfg.get("vision_feature_select_strategy", "patch")
    if strategy not in _SELECT:
        raise ImportFormatError(
            f"{config_file}: unknown vision_feature_select_strategy {strategy!r}"
        )
    aspect = cfg.get("image_aspect_ratio", "square")
    if aspect not in ("square", "pad"):
        raise ImportFormatError(
            f"{config_file}: image_aspect_ratio {aspect!r}; lmm imports 'square' and 'pad'"
        )

    state = read_tensors(src)
    vision_state = take(state, "vision_tower._vision_tower.", drop="vision_model.")
    connector, connector_state = sequential_projector(
        take(state, "connector._connector."),
        cfg["connector_type"],
        str(config_file),
        "connector_type",
    )
    llm_state = take(state, "language_model.")
    if state:
        raise ImportFormatError(f"{src}: tensors {sorted(state)[:3]} belong to no known part")

    notes: list[str] = []
    processor = _image_processor(src, options, notes)
    preprocess = "pad" if aspect == "pad" else square_preprocess(processor or {}, notes)
    tokenizer = load_tokenizer_from(options.tokenizer, str(src))
    return ImportedModel(
        vision_config=vision_config,
        vision_state=vision_state,
        image_processor=processor,
        text_config=text_config,
        llm_state=llm_state,
        tokenizer=tokenizer,
        connector=connector,
        connector_state=connector_state,
        vision=VisionConfig(
            kind="hf",
            name_or_path="vision",
            feature_layer=int(cfg.get("vision_feature_layer", -2)),
            select=_SELECT[strategy],
            image_preprocess=preprocess,
        ),
        template=TEMPLATES.get(family),
        system_prompt=VICUNA_SYSTEM,
        max_length=int(cfg.get("tokenizer_model_max_length") or 2048),
        conventions=REFERENCE_CONVENTIONS,
        source={"format": "tinyllava", "path": str(src)},
        notes=notes,
    )
