"""``python -m lmm export --ckpt DIR --out HF_DIR``: an lmm checkpoint as a Hugging Face LLaVA model.

The output loads with ``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor`` (and so
with the tools that read that format, e.g. vLLM) and computes the same function as lmm:

* vision tower: a transformers CLIP or SigLIP vision model. lmm keeps only the layers up to
  ``feature_layer``, so the export has ``num_hidden_layers`` = kept layers and
  ``vision_feature_layer = -1``; LLaVA reads ``hidden_states[-1]``, the output of the last kept
  layer before ``post_layernorm`` (written as an unused identity-initialised norm), which is
  exactly lmm's feature. CLIP's CLS token is dropped (``vision_feature_select_strategy
  "default"``), SigLIP keeps every patch (``"full"``), following the tower's own ``select``.
* connector: ``mlp2x_gelu`` is LLaVA's projector (linear, exact GELU, linear). ``linear`` is
  written as ``linear_1`` = the layer, ``projector_hidden_act "linear"`` and ``linear_2`` = the
  identity, which is exact. Other connectors (deeper MLPs, pooling) have no LLaVA equivalent.
* language model: any causal LM whose base model ``AutoModel.from_config`` rebuilds.
* processor: the tokenizer (``<image>`` included), an image processor equal to lmm's
  transform (bicubic resize of the whole image to the tower's square size, no crop, the
  tower's mean/std) and the checkpoint's conversation template as the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lmm.checkpoints.directory import (
    Checkpoint,
    complete_vision_state,
    image_processor_for,
)
from lmm.constants import IMAGE_TOKEN
from lmm.data.templates import Template, TokenizerChatTemplate, stop_token_ids
from lmm.errors import ExportError
from lmm.model.connectors import as_connector_config

# Towers whose transformers class LLaVA's vision_tower can be (AutoModel of the vision config).
_FITTING_TOWERS = {
    "clip_vision_model": 1,
    "siglip_vision_model": 0,
}  # model type -> tokens before the patches
_FITTING_CONNECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}


# -- chat template -------------------------------------------------------------------------------


def _lit(text: str) -> str:
    """A Jinja string literal (JSON escapes are Jinja escapes)."""
    return json.dumps(text)


def _emit(fmt: str, var: str) -> str:
    """Jinja that writes ``fmt`` with ``{text}`` replaced by the variable ``var``."""
    before, sep, after = fmt.partition("{text}")
    parts = [_lit(before)] + ([var, _lit(after)] if sep else [])
    return "{{ " + " + ".join(parts) + " }}"


def chat_template_for(template: Template, tokenizer=None) -> str:
    """A Jinja chat template that renders messages exactly as ``template.render`` does.

    The ``tokenizer`` template renders with the tokenizer's own chat template, which is kept.

    Message content may be a string (with ``<image>`` where the image goes) or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts; an image part becomes
    ``<image>\\n`` (LLaVA's placement). A ``system`` message replaces the default system prompt.
    """
    if isinstance(template, TokenizerChatTemplate):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ExportError(
                "data.template 'tokenizer': the tokenizer has no chat template to export"
            )
        return tokenizer.chat_template
    eot_before, eos_sep, eot_after = template.end_of_turn.partition("{eos}")
    end_of_turn = _lit(eot_before) + (" + eos_token + " + _lit(eot_after) if eos_sep else "")
    end_of_turn += " + " + _lit(template.after_turn)
    user_text = (
        _lit(IMAGE_TOKEN) + " * (text.split(" + _lit(IMAGE_TOKEN) + ") | length - 1)"
        if template.images_only_prompt
        else "text"
    )
    system = (
        ""
        if template.images_only_prompt
        else ("{%- if ns.system -%}" + _emit(template.system_format, "ns.system") + "{%- endif -%}")
    )
    return (
        "{%- macro content_text(content) -%}"
        "{%- if content is string -%}{{ content }}{%- else -%}"
        "{%- for part in content -%}"
        "{%- if part['type'] == 'image' -%}{{ " + _lit(IMAGE_TOKEN + "\n") + " }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- set ns = namespace(system=" + _lit(template.system) + ") -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = content_text(messages[0]['content']) -%}{%- endif -%}"
        + system
        + "{%- for message in messages -%}"
        "{%- set text = content_text(message['content']) -%}"
        "{%- if message['role'] == 'user' -%}"
        + _emit(template.user_format, user_text)
        + "{%- if not loop.last or add_generation_prompt -%}{{ "
        + _lit(template.assistant_open)
        + " }}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ " + _lit(template.answer_prefix) + " + text + " + end_of_turn + " }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


# -- weights -------------------------------------------------------------------------------------


def _prefix_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ExportError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def _check_fit(ckpt: Checkpoint) -> tuple[object, str, str]:
    """(the tower's transformers model, projector activation, select strategy), or ExportError."""
    model, info = ckpt.model, ckpt.info
    if model.image_layout is not None:
        raise ExportError(
            "model.vision.anyres / model.vision.video: the Hugging Face LLaVA format shows every image as one "
            "fixed-size view, with no crops, newline embedding or video pooling; export a model without them "
            "(a LLaVA-OneVision export is not implemented)"
        )
    kind = info["model"]["vision"].get("kind", "hf")
    tower = getattr(model.vision, "model", None)
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    if kind != "hf" or model_type not in _FITTING_TOWERS:
        raise ExportError(
            f"model.vision: tower kind {kind!r} (model type {model_type!r}) does not fit the Hugging Face LLaVA "
            f"format, which needs a transformers vision model of type {' or '.join(sorted(_FITTING_TOWERS))} "
            "(model.vision.kind: hf)"
        )
    connector = as_connector_config(info["model"]["connector"]).name
    if connector not in _FITTING_CONNECTORS:
        raise ExportError(
            f"model.connector: {connector!r} does not fit the Hugging Face LLaVA format, whose projector is "
            f"linear-GELU-linear; exportable connectors: {', '.join(sorted(_FITTING_CONNECTORS))}"
        )
    cfg = tower.config
    grid = cfg.image_size // cfg.patch_size
    dropped = grid * grid + _FITTING_TOWERS[model_type] - model.vision.num_tokens
    if dropped not in (0, 1) or model.connector.num_output_tokens != model.vision.num_tokens:
        raise ExportError(
            f"model.vision.select: the tower gives {model.vision.num_tokens} of {grid * grid} patch tokens; LLaVA can "
            "only keep all tokens or drop the first one"
        )
    return tower, _FITTING_CONNECTORS[connector], "default" if dropped == 1 else "full"


def _connector_state(connector: nn.Module, kind: str, text_dim: int) -> dict[str, torch.Tensor]:
    layers = [m for m in connector.modules() if isinstance(m, nn.Linear)]
    if kind == "gelu":
        gelus = [m for m in connector.modules() if isinstance(m, nn.GELU)]
        if len(layers) != 2 or len(gelus) != 1 or gelus[0].approximate != "none":
            raise ExportError(
                "model.connector: expected Linear, GELU (exact), Linear for 'mlp2x_gelu'"
            )
        first, second = layers
        return {
            "linear_1.weight": first.weight, "linear_1.bias": first.bias,
            "linear_2.weight": second.weight, "linear_2.bias": second.bias,
        }  # fmt: skip
    if len(layers) != 1:
        raise ExportError("model.connector: expected one Linear layer for 'linear'")
    (only,) = layers
    eye = torch.eye(
        text_dim, dtype=only.weight.dtype
    )  # linear_2 = identity: exact in floating point
    return {
        "linear_1.weight": only.weight, "linear_1.bias": only.bias,
        "linear_2.weight": eye, "linear_2.bias": torch.zeros(text_dim, dtype=only.weight.dtype),
    }  # fmt: skip


def _portable(config: dict) -> dict:
    """A part's config without the local path it was loaded from."""
    return {k: v for k, v in config.items() if k != "_name_or_path"}


def llava_state_and_config(ckpt: Checkpoint):
    """(LlavaConfig, state dict in ``LlavaForConditionalGeneration``'s key names)."""
    from transformers import LlavaConfig

    model = ckpt.model
    tower, act, strategy = _check_fit(ckpt)
    llm = model.llm
    text_config = llm.config
    vision_config = tower.config
    if hasattr(vision_config, "vision_use_head"):
        vision_config.vision_use_head = False  # lmm removed the pooling head
    config = LlavaConfig(
        vision_config=_portable(vision_config.to_dict()),
        text_config=_portable(text_config.to_dict()),
        projector_hidden_act=act,
        vision_feature_layer=-1,
        vision_feature_select_strategy=strategy,
        image_seq_length=model.num_image_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    # The field is image_token_index in some transformers versions and image_token_id in others.
    for field in ("image_token_index", "image_token_id"):
        try:
            setattr(config, field, model.image_token_id)
        except (AttributeError, TypeError, ValueError):
            pass

    state: dict[str, torch.Tensor] = {}
    for k, v in complete_vision_state(tower).items():
        state[f"model.vision_tower.{k}"] = v
    for k, v in _connector_state(model.connector, act, text_config.hidden_size).items():
        state[f"model.multi_modal_projector.{k}"] = v
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, llm.base_model_prefix)
    base_prefix = _prefix_of(llm, base) + "."
    head_prefix = _prefix_of(llm, llm.get_output_embeddings()) + "."
    for k, v in llm.state_dict().items():
        if k.startswith(base_prefix):
            state["model.language_model." + k[len(base_prefix) :]] = v
        elif k.startswith(head_prefix):
            state["lm_head." + k[len(head_prefix) :]] = v
        else:
            raise ExportError(
                f"model.llm: tensor {k!r} belongs to neither the base model nor the LM head"
            )
    return config, state


def export_llava(
    ckpt: Checkpoint, out_dir: str | Path, dtype: Optional[torch.dtype] = None
) -> Path:
    """Write ``ckpt`` to ``out_dir`` as a Hugging Face LLaVA model + processor."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    config, state = llava_state_and_config(ckpt)
    dtype = dtype or next(ckpt.model.parameters()).dtype
    # Build the transformers model without allocating weights, then hand it ours.
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    if type(hf.model.vision_tower) is not type(ckpt.model.vision.model):
        raise ExportError(
            f"model.vision: LLaVA would build {type(hf.model.vision_tower).__name__}, lmm has "
            f"{type(ckpt.model.vision.model).__name__}"
        )
    expected = hf.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        part = (
            (missing + unexpected)[0].split(".")[1]
            if (missing + unexpected)[0].startswith("model.")
            else "llm"
        )
        raise ExportError(
            f"model.{part}: the LLaVA layout does not match lmm's weights "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    bad = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ExportError(
            f"tensor {bad[0]!r}: lmm has {tuple(state[bad[0]].shape)}, LLaVA expects {tuple(expected[bad[0]].shape)}"
        )
    hf.load_state_dict(
        {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()},
        strict=False,
        assign=True,
    )
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.config.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = ckpt.model.tokenizer
    eos = [tok.eos_token_id] + stop_token_ids(tok, ckpt.template)
    hf.generation_config = HFGenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tok.pad_token_id,
        max_new_tokens=ckpt.generation.max_new_tokens,
    )
    hf.save_pretrained(out)

    template = chat_template_for(ckpt.template, tok)
    tok.chat_template = template
    tower = ckpt.model.vision.model
    processor = LlavaProcessor(
        image_processor=image_processor_for(ckpt.model.vision.image_spec),
        tokenizer=tok,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=_FITTING_TOWERS[tower.config.model_type],
    )
    processor.save_pretrained(out)
    # Readers that predate processor_config.json look for preprocessor_config.json.
    processor.image_processor.save_pretrained(out)
    return out


# -- `python -m lmm export` ----------------------------------------------------------------------
