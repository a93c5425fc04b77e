"""``python -m lmm export --ckpt DIR --out HF_DIR``: an lmm checkpoint as a Hugging Face LLaVA or
LLaVA-OneVision model (registry ``EXPORT_FORMATS``: ``llava_hf``, ``llava_onevision_hf``).

The output loads with ``LlavaForConditionalGeneration`` / ``LlavaOnevisionForConditionalGeneration``
``.from_pretrained`` and ``AutoProcessor`` in transformers 4.x and 5.x (``lmm.checkpoints.hf_files``)
and computes the same function as lmm:

* vision tower: a transformers CLIP or SigLIP vision model. A tower lmm cut at its feature
  layer is written with its kept layers plus one identity layer and ``vision_feature_layer =
  -2``, so LLaVA reads the last kept layer's output before any norm, exactly lmm's feature, in
  transformers 4.x and 5.x alike (see ``_vision_part``); the removed final norm is an unused
  identity-initialised stand-in. An imported tower, kept whole in the checkpoint, is written
  whole with its feature layer, so exporting an import gives the source back bit for bit.
  CLIP's CLS token is dropped (``vision_feature_select_strategy "default"``), SigLIP keeps every
  patch (``"full"``), following the tower's own ``select``.
* connector: ``mlp2x_gelu`` is LLaVA's projector (linear, exact GELU, linear). ``linear`` is
  written as ``linear_1`` = the layer, ``projector_hidden_act "linear"`` and ``linear_2`` = the
  identity, which is exact. Other connectors (deeper MLPs, pooling) have no LLaVA equivalent.
* OneVision: AnyRes grids -> ``image_grid_pinpoints``, the budget -> ``vision_aspect_ratio
  anyres_max_N``, ``connector.image_newline`` -> ``image_newline``; video frames are pooled by 2
  per side with one newline after the clip in both.
* language model: any causal LM whose base model ``AutoModel.from_config`` rebuilds.
* processor: the tokenizer (``<image>`` included), an image processor preparing images as lmm
  does, and the checkpoint's conversation template as a chat template accepting string or
  ``{"type": "image"} / {"type": "text"}`` content. ``lmm_prompting.json`` keeps the prompt
  conventions for ``lmm import``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from lmm.checkpoints.chat_template import chat_template_for
from lmm.checkpoints.directory import (
    Checkpoint,
    complete_vision_state,
    image_processor_for,
    plain_state,
    resolve_part,
)
from lmm.checkpoints.formats.common import PROMPTING_FILE, prompting_record
from lmm.checkpoints.hf_files import make_portable, state_mismatch, write_hub_weights
from lmm.constants import IMAGE_TOKEN
from lmm.data.templates import stop_token_ids
from lmm.errors import ExportError
from lmm.model.connectors import as_connector_config
from lmm.model.language import add_special_token
from lmm.model.towers import VisionConfig
from lmm.registry import Registry

log = logging.getLogger("lmm")

# Towers whose transformers class LLaVA's vision_tower can be (AutoModel of the vision config).
_FITTING_TOWERS = {
    "clip_vision_model": 1,
    "siglip_vision_model": 0,
}  # model type -> tokens before the patches
_FITTING_CONNECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}
VIDEO_TOKEN = "<video>"  # OneVision's video placeholder (lmm uses one <image> per clip)


# -- parts ---------------------------------------------------------------------------------------


def _prefix_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ExportError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def _check_parts(ckpt: Checkpoint) -> tuple[object, str, str]:
    """(the tower's transformers model, projector activation, select strategy), or ExportError."""
    model, info = ckpt.model, ckpt.info
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


def _saved_tower(ckpt, tower) -> Optional[nn.Module]:
    """The tower as the checkpoint directory stores it (an imported tower whole, with the layers
    after its feature layer, final norm and head), or None without a directory to read."""
    path = getattr(ckpt, "path", None)
    entry = (getattr(ckpt, "info", None) or {}).get("model", {}).get("vision", {})
    if path is None or not entry.get("name_or_path"):
        return None
    folder = Path(resolve_part(Path(path), entry["name_or_path"]))
    if not (folder / "config.json").is_file():
        return None
    return type(tower).from_pretrained(folder, dtype=next(tower.parameters()).dtype)


def _cut_at_feature_layer(saved: Optional[nn.Module], kept: int) -> bool:
    """Whether the tower ends at lmm's feature layer (lmm saved it cut there, its final norm an
    identity-initialised stand-in), rather than being a whole imported tower."""
    if saved is None:
        return True
    if saved.config.num_hidden_layers > kept:
        return False
    norm = next((m for n, m in saved.named_modules() if n.endswith("post_layernorm")), None)
    return norm is not None and bool((norm.weight == 1).all() and (norm.bias == 0).all())


def _identity_layer(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Encoder layer ``index`` computing the identity: a CLIP / SigLIP layer adds its attention
    and MLP outputs to its input, and with ``out_proj`` and ``fc2`` zero both add exact zeros."""
    prefix = f"encoder.layers.{index - 1}."
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix) :]
            fill = (
                torch.ones_like
                if name.startswith("layer_norm") and name.endswith("weight")
                else torch.zeros_like
            )
            out[f"encoder.layers.{index}.{name}"] = fill(value)
    return out


def _vision_part(ckpt, tower) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(vision config, tower tensors, vision_feature_layer).

    An imported tower: the kept layers from the model (as trained), the rest (later layers,
    final norm, head) from the saved tower, so it is written back as it came. A tower lmm cut
    at its feature layer: its layers plus one identity layer, read at ``-2``. ``-1`` would not
    do: transformers 4.5x replaces ``hidden_states[-1]`` by the post-normalised output (its
    ``check_model_inputs``), 5.x does not; ``hidden_states[-2]`` is the same in both.
    """
    saved = _saved_tower(ckpt, tower)
    kept = tower.config.num_hidden_layers
    if not _cut_at_feature_layer(saved, kept):
        state = {**saved.state_dict(), **plain_state(tower)}
        return saved.config.to_dict(), state, kept - saved.config.num_hidden_layers - 1
    config = copy.deepcopy(tower.config)
    if hasattr(config, "vision_use_head"):
        config.vision_use_head = False  # lmm removed the pooling head
    state = complete_vision_state(tower)
    state.update(_identity_layer(state, kept))
    config.num_hidden_layers = kept + 1
    return config.to_dict(), state, -2


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
    # linear_2 = identity: exact in floating point
    eye = torch.eye(text_dim, dtype=only.weight.dtype)
    return {
        "linear_1.weight": only.weight, "linear_1.bias": only.bias,
        "linear_2.weight": eye, "linear_2.bias": torch.zeros(text_dim, dtype=only.weight.dtype),
    }  # fmt: skip


def _portable(config: dict) -> dict:
    """A part's config without the local path it was loaded from."""
    return {k: v for k, v in config.items() if k != "_name_or_path"}


def _language_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The LM's tensors under LLaVA's names (``model.language_model.*``, ``lm_head.*``)."""
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, llm.base_model_prefix)
    base_prefix = _prefix_of(llm, base) + "."
    head_prefix = _prefix_of(llm, llm.get_output_embeddings()) + "."
    head = llm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ExportError(
            f"model.llm: the LM head of {type(llm).__name__} has a bias (Phi-2's does); the Hugging Face "
            "LLaVA / OneVision classes build lm_head without one, so this model has no exact export"
        )
    state = {}
    for k, v in plain_state(llm).items():
        if k.startswith(base_prefix):
            state["model.language_model." + k[len(base_prefix) :]] = v
        elif k.startswith(head_prefix):
            state["lm_head." + k[len(head_prefix) :]] = v
        else:
            raise ExportError(
                f"model.llm: tensor {k!r} belongs to neither the base model nor the LM head"
            )
    return state


def _common_parts(ckpt: Checkpoint) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config fields, state) shared by the LLaVA and OneVision exports."""
    model = ckpt.model
    tower, act, strategy = _check_parts(ckpt)
    text_config = model.llm.config
    vision_config, vision_state, layer = _vision_part(ckpt, tower)
    state = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    for k, v in _connector_state(model.connector, act, text_config.hidden_size).items():
        state[f"model.multi_modal_projector.{k}"] = v
    state.update(_language_state(model.llm))
    fields = dict(
        vision_config=_portable(vision_config),
        text_config=_portable(text_config.to_dict()),
        projector_hidden_act=act,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    return fields, state, {"tower": tower}


def _set_token_field(config, field: str, value: int) -> None:
    """``image_token_index`` in some transformers versions, ``image_token_id`` in others: set both."""
    for name in (f"{field}_index", f"{field}_id"):
        try:
            setattr(config, name, value)
        except (AttributeError, TypeError, ValueError):
            pass


def llava_state_and_config(ckpt: Checkpoint):
    """(LlavaConfig, state dict in ``LlavaForConditionalGeneration``'s key names)."""
    from transformers import LlavaConfig

    model = ckpt.model
    if model.image_layout is not None:
        raise ExportError(
            "model.vision.anyres / model.vision.video: the Hugging Face LLaVA format shows every image as one "
            "fixed-size view, with no crops, newline embedding or video pooling; export it as "
            "llava_onevision_hf (python -m lmm export --format llava_onevision_hf)"
        )
    fields, state, _ = _common_parts(ckpt)
    config = LlavaConfig(image_seq_length=model.num_image_tokens, **fields)
    _set_token_field(config, "image_token", model.image_token_id)
    return config, state


def _pinpoints(layout) -> tuple[list[list[int]], str]:
    """OneVision's ``image_grid_pinpoints`` ([height, width] px) and ``vision_aspect_ratio``."""
    from lmm.checkpoints.formats.llava_onevision_hf import SHRINK_TOLERANCE

    anyres, tile = layout.anyres, layout.tile
    if anyres is None:
        raise ExportError(
            "model.vision.anyres: a OneVision export needs AnyRes settings (the format always shows single "
            "images as a base view plus crops)"
        )
    grids = anyres.candidates()
    if anyres.shrink_tolerance != SHRINK_TOLERANCE:
        raise ExportError(
            f"model.vision.anyres.shrink_tolerance: transformers' OneVision shrinks at {SHRINK_TOLERANCE}, "
            f"this model at {anyres.shrink_tolerance}"
        )
    # No budget: one larger than any grid's crop count never shrinks (the ratio stays <= 1).
    budget = anyres.max_tiles if anyres.max_tiles is not None else max(r * c for r, c in grids)
    return [[r * tile, c * tile] for r, c in grids], f"anyres_max_{budget}"


def _video_tokenizer(ckpt, llm_state: dict, text_config: dict):
    """A copy of the tokenizer with OneVision's ``<video>`` token; embedding rows added (the mean
    row, as the importer adds them) when the LM has no spare row for it."""
    tok = copy.deepcopy(ckpt.model.tokenizer)
    if VIDEO_TOKEN not in tok.get_vocab():
        add_special_token(tok, VIDEO_TOKEN)
    embed = ckpt.model.llm.get_input_embeddings()
    embed_key = (
        "model.language_model." + _prefix_of(ckpt.model.llm.get_decoder(), embed) + ".weight"
    )
    rows = llm_state[embed_key].shape[0]
    if len(tok) > rows:
        new_rows = -(-len(tok) // 64) * 64
        for key in (embed_key, "lm_head.weight"):
            if key in llm_state:
                w = llm_state[key]
                fill = w.float().mean(0, keepdim=True).to(w.dtype).expand(new_rows - rows, -1)
                llm_state[key] = torch.cat([w, fill])
        text_config["vocab_size"] = new_rows
    return tok


def onevision_state_and_config(ckpt: Checkpoint):
    """(LlavaOnevisionConfig, state dict, tokenizer with ``<video>``) for
    ``LlavaOnevisionForConditionalGeneration``."""
    from transformers import LlavaOnevisionConfig

    from lmm.checkpoints.formats.llava_onevision_hf import VIDEO_POOL

    model = ckpt.model
    layout = model.image_layout
    if layout is None:
        raise ExportError(
            "model.vision.anyres: this model shows every image as one view; export it as llava_hf"
        )
    if layout.video is not None and layout.video.pool != VIDEO_POOL:
        raise ExportError(
            f"model.vision.video.pool: transformers' OneVision pools frames by {VIDEO_POOL}, this model by "
            f"{layout.video.pool}"
        )
    pinpoints, aspect = _pinpoints(layout)
    fields, state, _ = _common_parts(ckpt)
    state["model.image_newline"] = model.connector.image_newline
    tok = _video_tokenizer(ckpt, state, fields["text_config"])
    config = LlavaOnevisionConfig(
        image_grid_pinpoints=pinpoints, vision_aspect_ratio=aspect, **fields
    )
    _set_token_field(config, "image_token", model.image_token_id)
    _set_token_field(config, "video_token", tok.convert_tokens_to_ids(VIDEO_TOKEN))
    if model.vision.image_spec.preprocess != "resize":
        log.warning(
            "model.vision.image_preprocess is %r: the exported OneVision image processor squashes the base "
            "view (resize), so non-square images are prepared differently there",
            model.vision.image_spec.preprocess,
        )
    return config, state, tok


# -- writing -------------------------------------------------------------------------------------


def _write(hf_class, config, state: dict, ckpt: Checkpoint, out: Path, dtype) -> None:
    """Check ``state`` against ``hf_class(config)`` and write config, weights and generation config."""
    from transformers import GenerationConfig as HFGenerationConfig

    with torch.device("meta"):
        hf = hf_class(config)
    if type(hf.model.vision_tower) is not type(ckpt.model.vision.model):
        raise ExportError(
            f"model.vision: the export would build {type(hf.model.vision_tower).__name__}, lmm has "
            f"{type(ckpt.model.vision.model).__name__}"
        )
    expected = hf.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing, unexpected, bad = state_mismatch(state, expected)
    if missing or unexpected:
        first = (missing + unexpected)[0]
        part = first.split(".")[1] if first.startswith("model.") else "llm"
        raise ExportError(
            f"model.{part}: the transformers layout does not match lmm's weights "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if bad:
        raise ExportError(
            f"tensor {bad[0]!r}: lmm has {tuple(state[bad[0]].shape)}, "
            f"transformers expects {tuple(expected[bad[0]].shape)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = [hf_class.__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    write_hub_weights({k: v.detach().to("cpu", dtype) for k, v in state.items()}, out)
    tok = ckpt.model.tokenizer
    eos = [tok.eos_token_id] + stop_token_ids(tok, ckpt.template)
    HFGenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tok.pad_token_id,
        max_new_tokens=ckpt.generation.max_new_tokens,
    ).save_pretrained(out)


def _finish(ckpt: Checkpoint, processor, out: Path) -> Path:
    processor.save_pretrained(out)
    # Readers that predate processor_config.json look for preprocessor_config.json.
    processor.image_processor.save_pretrained(out)
    make_portable(out)
    vision = VisionConfig(**ckpt.info["model"]["vision"])
    record = prompting_record(ckpt, vision)
    (out / PROMPTING_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def export_llava(
    ckpt: Checkpoint, out_dir: str | Path, dtype: Optional[torch.dtype] = None
) -> Path:
    """Write ``ckpt`` to ``out_dir`` as a Hugging Face LLaVA model + processor."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    config, state = llava_state_and_config(ckpt)
    out = Path(out_dir)
    _write(
        LlavaForConditionalGeneration, config, state, ckpt, out, dtype or ckpt.model.connector_dtype
    )
    tok = copy.deepcopy(ckpt.model.tokenizer)
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
    return _finish(ckpt, processor, out)


def export_onevision(
    ckpt: Checkpoint, out_dir: str | Path, dtype: Optional[torch.dtype] = None
) -> Path:
    """Write ``ckpt`` (AnyRes, optionally video) as a Hugging Face LLaVA-OneVision model + processor."""
    from transformers import (
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    config, state, tok = onevision_state_and_config(ckpt)
    out = Path(out_dir)
    _write(
        LlavaOnevisionForConditionalGeneration,
        config,
        state,
        ckpt,
        out,
        dtype or ckpt.model.connector_dtype,
    )
    template = chat_template_for(ckpt.template, tok)
    tok.chat_template = template
    spec, tower = ckpt.model.vision.image_spec, ckpt.model.vision.model
    side = {"height": spec.size, "width": spec.size}
    common = dict(
        size=side,
        resample=3,
        do_convert_rgb=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )
    grid = tower.config.image_size // tower.config.patch_size
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True, **common
        ),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(**common),
        # Tokens of one view before ``default`` drops the first (CLIP: CLS + patches).
        num_image_tokens=grid * grid + _FITTING_TOWERS[tower.config.model_type],
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    return _finish(ckpt, processor, out)


EXPORT_FORMATS: Registry[Callable[..., Path]] = Registry("export format")
EXPORT_FORMATS.add("llava_hf", export_llava)
EXPORT_FORMATS.add("llava_onevision_hf", export_onevision)


def default_export_format(ckpt: Checkpoint) -> str:
    """``llava_onevision_hf`` for a model with AnyRes / video, else ``llava_hf``."""
    return "llava_hf" if ckpt.model.image_layout is None else "llava_onevision_hf"
