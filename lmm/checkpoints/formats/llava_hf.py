"""Format ``llava_hf``: transformers ``LlavaForConditionalGeneration`` folders (the llava-hf/* hub
repos, lmm's own exports, and what transformers 5 writes).

The folder is loaded with transformers' own class, which reads every key layout those sources
use (``language_model.model.*`` with or without ``vision_tower.vision_model.*``, or the native
``model.*`` names); lmm takes its submodules apart:

* tower: ``model.vision_tower`` (kept whole; ``vision_feature_layer`` is lmm's feature layer,
  ``vision_feature_select_strategy`` ``default`` drops the first token as lmm's ``select:
  patch`` does, ``full`` keeps all);
* connector: ``multi_modal_projector`` linear-GELU-linear -> ``mlp2x_gelu``; with
  ``projector_hidden_act: linear`` and an identity ``linear_2`` (how lmm exports ``linear``)
  -> ``linear``;
* LM: ``model.language_model`` + ``lm_head`` as the family's causal LM; tokenizer from SRC.

Prompts: LLaVA-1.5's (``vicuna`` with its system prompt, ``<image>`` first, chunked
tokenization, its answer suffixes), or what ``lmm export`` recorded in ``lmm_prompting.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmm.checkpoints.formats.common import (
    ImportedModel,
    ImportOptions,
    apply_prompting_file,
    hf_template,
    image_processor_config,
    load_tokenizer_from,
    projector_connector,
    read_json,
    square_preprocess,
)
from lmm.constants import IMAGE_TOKEN
from lmm.data.prompts import LLAVA_ANSWER_SUFFIXES, PromptConventions
from lmm.data.templates import VICUNA_SYSTEM
from lmm.errors import ImportFormatError
from lmm.model.towers import VisionConfig

# The prompt conventions of the LLaVA family's training code (llava/train/train.py
# preprocess_multimodal moves <image> first; llava/mm_utils.py tokenizer_image_token).
REFERENCE_CONVENTIONS = PromptConventions(
    image_placement="llava",
    tokenization="chunked",
    image_position="before",
    answer_suffixes=dict(LLAVA_ANSWER_SUFFIXES),
)


def load_transformers_model(cls, src: Path, expected_type: str):
    """``cls.from_pretrained(src)`` in the stored dtype, refusing any missing or unused tensor."""
    config = read_json(src / "config.json", "the model's config")
    if "mm_vision_tower" in config:  # released LLaVA-1.5 configs also say model_type "llava"
        raise ImportFormatError(
            f"{src / 'config.json'}: an original LLaVA checkpoint (mm_vision_tower, architectures "
            f"{config.get('architectures')}), not a transformers one: use --from llava"
        )
    if config.get("model_type") != expected_type:
        raise ImportFormatError(
            f"{src / 'config.json'}: model_type is {config.get('model_type')!r}, expected {expected_type!r}"
        )
    model, report = cls.from_pretrained(
        src, dtype="auto", output_loading_info=True, trust_remote_code=False
    )
    problems = {
        k: v
        for k, v in report.items()
        if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        raise ImportFormatError(f"{src}: transformers could not load every tensor: {problems}")
    return model.eval()


def split_parts(hf, src: Path, options: ImportOptions) -> ImportedModel:
    """The tower, projector and LM of a loaded Llava-style model, with the LLaVA-1.5 defaults."""
    from transformers import AutoModelForCausalLM

    cfg = hf.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ImportFormatError(
            f"{src}: vision_feature_layer {layer!r} concatenates several layers; lmm reads one"
        )
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ImportFormatError(f"{src}: unknown vision_feature_select_strategy {strategy!r}")

    proj = hf.model.multi_modal_projector
    first, second = proj.linear_1, proj.linear_2
    where = f"{src}: multi_modal_projector"
    if cfg.projector_hidden_act == "gelu":
        connector, connector_state = projector_connector(
            [(first.weight, first.bias), (second.weight, second.bias)], where
        )
    elif cfg.projector_hidden_act == "linear" and _is_identity(second):
        connector, connector_state = projector_connector([(first.weight, first.bias)], where)
    else:
        raise ImportFormatError(
            f"{where}: projector_hidden_act {cfg.projector_hidden_act!r} (with this linear_2) has no lmm "
            "connector; lmm reads 'gelu' (mlp2x_gelu) and 'linear' with an identity linear_2 (linear)"
        )

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg.text_config)
    decoder = next(n for n, m in lm.named_modules() if m is lm.get_decoder())
    head = next(n for n, m in lm.named_modules() if m is lm.get_output_embeddings())
    llm_state = {f"{decoder}.{k}": v for k, v in hf.model.language_model.state_dict().items()}
    llm_state.update({f"{head}.{k}": v for k, v in hf.lm_head.state_dict().items()})

    processor = image_processor_config(src)
    tower_size = cfg.vision_config.image_size
    crop = processor.get("crop_size") or processor.get("size") or {}
    if isinstance(crop, dict) and crop.get("height", tower_size) != tower_size:
        raise ImportFormatError(
            f"{src}: the image processor prepares images at {crop}, the tower takes {tower_size} px"
        )
    notes: list[str] = []
    tokenizer = load_tokenizer_from(options.tokenizer, str(src))
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != cfg.image_token_id:
        raise ImportFormatError(
            f"{src}: the tokenizer's {IMAGE_TOKEN} is id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
            f"the config's image_token_index is {cfg.image_token_id}"
        )
    max_length = getattr(tokenizer, "model_max_length", None)
    if not max_length or max_length > 10**6:
        max_length = getattr(cfg.text_config, "max_position_embeddings", 2048)
    template = hf_template(cfg.text_config.model_type)
    model = ImportedModel(
        vision_config=cfg.vision_config,
        vision_state=dict(hf.model.vision_tower.state_dict()),
        image_processor=processor,
        text_config=cfg.text_config,
        llm_state=llm_state,
        tokenizer=tokenizer,
        connector=connector,
        connector_state={k: v.detach() for k, v in connector_state.items()},
        vision=VisionConfig(
            kind="hf",
            name_or_path="vision",
            feature_layer=layer,
            select="patch" if strategy == "default" else "full",
            image_preprocess=square_preprocess(processor, notes),
        ),
        template=template,
        system_prompt=VICUNA_SYSTEM if template == "vicuna" else None,
        max_length=int(max_length),
        conventions=REFERENCE_CONVENTIONS,
        source={"format": None, "path": str(src)},
        notes=notes,
    )
    return model


def _is_identity(linear: torch.nn.Linear) -> bool:
    w = linear.weight
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    bias_zero = linear.bias is None or not linear.bias.any()
    return w.shape[0] == w.shape[1] and torch.equal(w, eye) and bias_zero


def read(src: Path, options: ImportOptions) -> ImportedModel:
    """A ``LlavaForConditionalGeneration`` folder -> parts."""
    from transformers import LlavaForConditionalGeneration

    hf = load_transformers_model(LlavaForConditionalGeneration, src, "llava")
    model = split_parts(hf, src, options)
    model.source["format"] = "llava_hf"
    apply_prompting_file(model, src)
    return model
