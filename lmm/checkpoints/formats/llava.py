"""Format ``llava``: checkpoints of the original LLaVA repository (haotian-liu/LLaVA,
``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``, e.g. liuhaotian/llava-v1.5-7b).

Facts read from that repository (``llava/model/llava_arch.py``, ``multimodal_projector/builder.py``,
``multimodal_encoder/clip_encoder.py``, ``train/train.py``), never its code:

* ``config.json`` is the LM's config plus ``mm_*`` fields. It is read as raw JSON: released
  v1.5 configs say ``model_type: "llava"``, which transformers' ``AutoConfig`` takes for its own
  ``LlavaConfig`` and silently fills with defaults.
* weights (safetensors, or ``pytorch_model*.bin`` shards loaded with ``weights_only=True``):
  the LM (``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``) and the
  projector ``model.mm_projector.{0,2}`` (``mlp2x_gelu``) or ``model.mm_projector`` (``linear``).
  Released checkpoints do not contain the tower: it is ``mm_vision_tower`` (a hub name; pass a
  local copy with ``--vision-tower``); a self-trained checkpoint's
  ``model.vision_tower.vision_tower.*`` tensors are used when present.
* features: ``hidden_states[mm_vision_select_layer]``, ``mm_vision_select_feature: patch``
  drops the first token (lmm ``select: patch``), ``cls_patch`` keeps all.
* ``image_aspect_ratio: pad`` -> ``image_preprocess: pad``; ``square`` / unset -> the tower's
  processor (resize, see ``square_preprocess``).
* ``<image>`` is not in the vocabulary (LLaVA splices features at id -200): lmm adds it as a
  new token (see ``common._add_image_token``).

Prompts: ``vicuna_v1`` (lmm ``vicuna``, its system prompt), ``<image>`` first, chunked
tokenization (``tokenizer_image_token``), LLaVA-1.5's answer suffixes.
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
    tower_folder,
    vision_config_from,
)
from lmm.checkpoints.formats.llava_hf import REFERENCE_CONVENTIONS
from lmm.data.templates import VICUNA_SYSTEM
from lmm.errors import ImportFormatError
from lmm.model.towers import VisionConfig

# LLaVA's language model classes -> the transformers model type of the LM they extend.
ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
# Defaults of llava/train/train.py ModelArguments for fields a config may lack.
_DEFAULTS = {
    "mm_vision_select_layer": -1,
    "mm_vision_select_feature": "patch",
    "mm_projector_type": "linear",
    "mm_patch_merge_type": "flat",
    "image_aspect_ratio": "square",
}


def text_config_from(raw: dict, family: str):
    """The LM's transformers config: the LLaVA config without its multimodal fields."""
    from transformers import AutoConfig

    fields = {
        k: v
        for k, v in raw.items()
        if not k.startswith(("mm_", "tune_", "freeze_", "unfreeze_"))
        and k
        not in (
            "model_type",
            "architectures",
            "image_aspect_ratio",
            "image_grid_pinpoints",
            "use_mm_proj",
            "tokenizer_model_max_length",
            "tokenizer_padding_side",
            "transformers_version",
            "_name_or_path",
        )
    }
    return AutoConfig.for_model(family, **fields)


def read(src: Path, options: ImportOptions) -> ImportedModel:
    """An original LLaVA checkpoint folder (+ its vision tower) -> parts."""
    from transformers import AutoConfig

    config_file = src / "config.json"
    raw = read_json(config_file, "the checkpoint's config")
    arch = (raw.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES or "mm_vision_tower" not in raw:
        raise ImportFormatError(
            f"{config_file}: architectures {raw.get('architectures')!r} with"
            f"{'' if 'mm_vision_tower' in raw else 'out'} mm_vision_tower is not an original LLaVA checkpoint "
            f"({', '.join(ARCHITECTURES)}); a transformers LLaVA folder is --from llava_hf"
        )
    cfg = {**_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    if cfg.get("mm_use_im_start_end"):
        raise ImportFormatError(
            f"{config_file}: mm_use_im_start_end wraps each image in <im_start>/<im_end> tokens, which lmm "
            "does not write"
        )
    if cfg["mm_patch_merge_type"] != "flat" or str(cfg["image_aspect_ratio"]).startswith("anyres"):
        raise ImportFormatError(
            f"{config_file}: mm_patch_merge_type {cfg['mm_patch_merge_type']!r} / image_aspect_ratio "
            f"{cfg['image_aspect_ratio']!r} is LLaVA-NeXT's AnyRes; import its transformers version "
            "(--from llava_onevision_hf) instead"
        )
    if cfg["mm_vision_select_feature"] not in ("patch", "cls_patch"):
        raise ImportFormatError(
            f"{config_file}: unknown mm_vision_select_feature {cfg['mm_vision_select_feature']!r}"
        )

    state = read_tensors(src)
    tower_dir = tower_folder(options.vision_tower, "--vision-tower", cfg["mm_vision_tower"])
    vision_config = vision_config_from(AutoConfig.from_pretrained(tower_dir))
    own_tower = take(state, "model.vision_tower.vision_tower.", drop="vision_model.")
    if own_tower:
        vision_state = own_tower  # a self-trained checkpoint saved its (possibly tuned) tower
    else:
        vision_state = _tower_state(tower_dir, vision_config)
    connector, connector_state = sequential_projector(
        take(state, "model.mm_projector."),
        cfg["mm_projector_type"],
        str(config_file),
        "mm_projector_type",
    )
    state.pop("model.image_newline", None)  # only used by the 'unpad' merge types refused above

    processor = read_json(
        tower_dir / "preprocessor_config.json", "the vision tower's image processor"
    )
    notes: list[str] = []
    preprocess = (
        "pad" if cfg["image_aspect_ratio"] == "pad" else square_preprocess(processor, notes)
    )
    tokenizer = load_tokenizer_from(options.tokenizer, str(src))
    return ImportedModel(
        vision_config=vision_config,
        vision_state=vision_state,
        image_processor=processor,
        text_config=text_config_from(raw, ARCHITECTURES[arch]),
        llm_state=state,
        tokenizer=tokenizer,
        connector=connector,
        connector_state=connector_state,
        vision=VisionConfig(
            kind="hf",
            name_or_path="vision",
            feature_layer=int(cfg["mm_vision_select_layer"]),
            select="patch" if cfg["mm_vision_select_feature"] == "patch" else "full",
            image_preprocess=preprocess,
        ),
        template="vicuna",
        system_prompt=VICUNA_SYSTEM,
        max_length=int(cfg.get("tokenizer_model_max_length") or 2048),
        conventions=REFERENCE_CONVENTIONS,
        source={"format": "llava", "path": str(src), "vision_tower": str(tower_dir)},
        notes=notes,
    )


def _tower_state(tower_dir: Path, vision_config) -> dict:
    """The tower's tensors from its own checkpoint (a vision model, or a full CLIP / SigLIP)."""
    import transformers

    from lmm.model.towers.hf import HF_VISION_MODELS

    class_name, _ = HF_VISION_MODELS[vision_config.model_type]
    tower, report = getattr(transformers, class_name).from_pretrained(
        tower_dir, dtype="auto", output_loading_info=True
    )
    if report.get("missing_keys"):
        raise ImportFormatError(
            f"{tower_dir}: the vision tower lacks tensors {sorted(report['missing_keys'])[:3]}"
        )
    return dict(tower.state_dict())
