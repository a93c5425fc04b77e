"""The lmm checkpoint directory: everything ``chat``, ``predict``, ``export`` and the lmms-eval
adapter need to rebuild a trained model, in one self-contained folder.

```
DIR/
  lmm.json              what to build: parts, connector, template, system prompt, max_length,
                        prompt conventions (``lmm.data.prompts``), generation defaults, image
                        spec (plain JSON, human-readable)
  vision/               the tower as trained (transformers ``save_pretrained``; layers after
                        feature_layer already removed, so it loads with feature_layer=-1; an
                        imported tower is kept whole and lmm.json names its feature_layer)
                        + preprocessor_config.json (size, mean, std)
  llm/                  the language model as trained + its tokenizer (``<image>`` included)
  weights.safetensors   every other trained tensor (the connector; a non-transformers tower),
                        keyed like the LMM, so ``--model.init_from DIR/weights.safetensors``
                        works in any LightningCLI run that builds from DIR/vision and DIR/llm
```

The parts load through the same ``from_pretrained`` path as a hub name (no pickle anywhere),
and nothing outside DIR is read for ``hf`` towers, so the folder can be copied to another
machine. It is written when a fit ends with ``model.save_checkpoint_dir`` set, from a
config plus a weights file with ``python -m lmm checkpoint --config X.yaml --out DIR``, or
from a released model with ``python -m lmm import`` (``lmm.checkpoints.formats``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmm.checkpoints.weights import load_weights, save_weights
from lmm.constants import IMAGE_TOKEN
from lmm.data.prompts import PromptConventions
from lmm.data.templates import Template, get_template
from lmm.errors import CheckpointError
from lmm.model.language import LanguageConfig
from lmm.model.lmm import LMM, GenerationConfig
from lmm.model.towers import VisionConfig

CONFIG_FILE = "lmm.json"
FORMAT = "lmm-checkpoint"
VERSION = 1
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class Checkpoint:
    """A loaded checkpoint directory."""

    model: LMM
    template: Template
    generation: GenerationConfig
    max_length: int
    path: Path
    info: dict[str, Any]
    conventions: PromptConventions = PromptConventions()

    @property
    def name(self) -> str:
        """A model id for result files: the directory's name."""
        return self.path.resolve().name


# -- writing -------------------------------------------------------------------------------------


def _hf_model(tower: nn.Module):
    """The transformers model inside an ``hf`` tower, or None for other tower kinds."""
    inner = getattr(tower, "model", None)
    return (
        inner
        if inner is not None and hasattr(inner, "save_pretrained") and hasattr(inner, "config")
        else None
    )


def plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with LoRA adapters (if any) merged into their base weights, under
    the plain layer names; the module itself is not changed."""
    from lmm.model.lora import lora_layers, merged_weight, split_key

    layers = lora_layers(module)
    state = module.state_dict()
    if not layers:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, part = split_key(key, layers)
        if part is None:
            out[key] = value
        elif part == "base":  # lora_A / lora_B are folded into the weight below
            plain = key.replace(".base_layer.", ".", 1)
            out[plain] = merged_weight(layers[prefix]) if plain == f"{prefix}.weight" else value
    return out


def complete_vision_state(model) -> dict[str, torch.Tensor]:
    """The tower's state plus identity-initialised norms for the modules lmm removed.

    lmm drops the final norm / pooling head (they never reach the features) and DINOv2's
    pretraining ``mask_token``; the transformers class still declares them, so without these
    entries every load would report them missing. Their values are unused: features are read
    before the norms, and the mask token only replaces patches masked in pretraining (it is
    written as zeros, transformers' own initial value).
    """
    state = dict(plain_state(model))
    with torch.device("meta"):
        reference = type(model)(copy.deepcopy(model.config))
    for name, t in reference.state_dict().items():
        if name in state:
            continue
        owner = reference.get_submodule(name.rpartition(".")[0])
        if name.endswith(".mask_token"):
            state[name] = torch.zeros(t.shape, dtype=next(iter(model.parameters())).dtype)
            continue
        if not isinstance(owner, nn.LayerNorm):
            raise CheckpointError(
                f"vision tower: parameter {name!r} is missing and is not a removed norm"
            )
        fill = torch.ones if name.endswith("weight") else torch.zeros
        state[name] = fill(t.shape, dtype=next(iter(model.parameters())).dtype)
    return state


def image_processor_for(spec):
    """A transformers image processor that prepares images as lmm's ``ImageTransform`` does.

    RGB; ``pad`` (LLaVA-1.5) pads to a square with ``int(mean * 255)`` first; then the resize:
    shortest edge + centre crop for ``crop`` (and ``square`` of a CLIP-style tower), a bicubic
    resize of the whole image to ``size x size`` otherwise; rescale to [0, 1],
    normalise with the tower's mean/std. With transformers' PIL backend this equals lmm's
    transform (``fill_rounding: nearest`` pads 1/255 lighter than the processor can);
    ``letterbox`` (scale, then pad) is written as ``pad`` (pad, then scale), which differs only
    in how the border pixels are resampled.
    """
    from transformers import LlavaImageProcessor

    square = {"height": spec.size, "width": spec.size}
    mode = getattr(spec, "mode", "resize")
    crop_from = getattr(spec, "crop_from", None) or spec.size
    return LlavaImageProcessor(
        do_pad=mode in ("pad", "letterbox"),
        size={"shortest_edge": crop_from} if mode == "crop" else square,
        crop_size=square,
        do_center_crop=True,
        do_resize=True,
        resample=3,  # PIL.Image.BICUBIC, as lmm.data.image
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        do_convert_rgb=True,
    )


def save_checkpoint_dir(
    model: LMM,
    out_dir: str | os.PathLike,
    *,
    vision: VisionConfig,
    llm: LanguageConfig,
    connector: Any,
    template: Template,
    max_length: int,
    generation: GenerationConfig = GenerationConfig(),
    conventions: PromptConventions = PromptConventions(),
    source: dict[str, Any] | None = None,
    parts_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` (as built from ``vision``/``llm``/``connector``: a name, a dict or a
    ``ConnectorConfig``) to ``out_dir``.

    ``parts_dir``: a folder already holding ``vision/`` (the whole tower, read at
    ``vision.feature_layer``) and ``llm/`` for exactly this model, as the importer writes them;
    they are moved in rather than written again. ``source`` replaces the recorded origin.

    The directory is written next to its final place and renamed at the end, so a crash
    never leaves a half-written checkpoint under the final name.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    holder = nn.Module()  # what goes to weights.safetensors, under the LMM's own key names
    holder.connector = model.connector
    tower = _hf_model(model.vision)
    if parts_dir is not None:
        for part in ("vision", "llm"):
            shutil.move(str(Path(parts_dir) / part), str(tmp / part))
        vision_entry = {**asdict(vision), "name_or_path": "vision"}
    elif vision.kind == "hf" and tower is not None:
        tower.save_pretrained(tmp / "vision", state_dict=complete_vision_state(tower))
        image_processor_for(model.vision.image_spec).save_pretrained(tmp / "vision")
        # The saved tower ends at the feature layer, so the last hidden state is the feature.
        vision_entry = {**asdict(vision), "name_or_path": "vision", "feature_layer": -1}
    else:
        holder.vision = model.vision  # rebuilt from its original source, then overwritten
        vision_entry = asdict(vision)
    if parts_dir is None:
        # LoRA adapters are merged: the directory holds plain models any loader reads.
        model.llm.save_pretrained(tmp / "llm", state_dict=plain_state(model.llm))
        model.tokenizer.save_pretrained(tmp / "llm")
    save_weights(holder, tmp / WEIGHTS_FILE)

    spec = model.vision.image_spec
    info = {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "vision": vision_entry,
            "llm": {**asdict(llm), "name_or_path": "llm"},
            "connector": connector if isinstance(connector, (str, dict)) else asdict(connector),
            "weights": WEIGHTS_FILE,
        },
        "data": {
            "template": template.name,
            "system_prompt": template.system,
            "max_length": max_length,
            **conventions.to_info(),
        },
        "generation": asdict(generation),
        "image": {
            "size": spec.size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "preprocess": getattr(spec, "preprocess", "resize"),
        },
        "num_image_tokens": model.num_image_tokens,
        "image_token": IMAGE_TOKEN,
        "source": source or {"vision": asdict(vision), "llm": asdict(llm)},
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# -- reading -------------------------------------------------------------------------------------


def read_info(path: str | os.PathLike, option: str = "--ckpt") -> dict[str, Any]:
    """``lmm.json`` of a checkpoint directory, with errors that say what to do."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{option} {str(path)!r}: no such directory")
    file = root / CONFIG_FILE
    if not file.is_file():
        hint = ""
        if (root / "config.json").is_file():
            hint = " (it looks like a transformers model folder; lmm parts go in model.vision / model.llm)"
        raise CheckpointError(
            f"{option} {str(path)!r} is not an lmm checkpoint directory: it has no {CONFIG_FILE}{hint}. "
            "Write one by setting model.save_checkpoint_dir in a fit config, or from a config and its weights "
            "with `python -m lmm checkpoint --config X.yaml --model.init_from W.safetensors --out DIR`"
        )
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{file}: 'format' is {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{file}: format version {info['version']} is newer than this lmm reads ({VERSION}); upgrade lmm"
        )
    return info


def resolve_part(root: Path, name_or_path: str) -> str:
    """Part paths inside the directory are stored relative to it."""
    local = root / name_or_path
    return str(local) if local.exists() else name_or_path


def load_checkpoint_dir(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    option: str = "--ckpt",
) -> Checkpoint:
    """Rebuild the model, template and generation defaults stored in ``path``."""
    root = Path(path)
    info = read_info(root, option)
    m = info["model"]
    vision = VisionConfig(
        **{**m["vision"], "name_or_path": resolve_part(root, m["vision"]["name_or_path"])}
    )
    llm = LanguageConfig(
        **{**m["llm"], "name_or_path": resolve_part(root, m["llm"]["name_or_path"])}
    )
    model = LMM(vision, llm, m["connector"], dtype=dtype)
    if m.get("weights"):
        load_weights(model, root / m["weights"])
    if model.num_image_tokens != info.get("num_image_tokens", model.num_image_tokens):
        raise CheckpointError(
            f"{root / CONFIG_FILE}: the rebuilt model gives {model.num_image_tokens} tokens per image, "
            f"the checkpoint says {info['num_image_tokens']}; the directory was edited or written by another lmm"
        )
    data = info.get("data", {})
    template = get_template(data.get("template", "plain"))
    if data.get("system_prompt") is not None:
        template = replace(template, system=data["system_prompt"])
    template = template.bind(model.tokenizer)  # checks the end-of-turn; `tokenizer` renders with it
    generation = GenerationConfig(**info.get("generation", {}))
    model.eval()
    if device is not None:
        model.to(device)
    return Checkpoint(
        model,
        template,
        generation,
        int(data.get("max_length", 2048)),
        root,
        info,
        PromptConventions.from_info(data),
    )


def fit_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model`` and ``data`` config sections that rebuild this checkpoint in a LightningCLI
    run (``fit``, ``test``): its parts, connector, weights (``model.init_from``), template and
    prompt conventions, with absolute paths. Training options (freeze, optim, data.train)
    are the caller's."""
    root = Path(path).resolve()
    info = read_info(root)
    m, data = info["model"], info.get("data", {})
    vision = {**m["vision"], "name_or_path": resolve_part(root, m["vision"]["name_or_path"])}
    llm = {**m["llm"], "name_or_path": resolve_part(root, m["llm"]["name_or_path"])}
    model: dict[str, Any] = {"vision": vision, "llm": llm, "connector": m["connector"]}
    if m.get("weights"):
        model["init_from"] = str(root / m["weights"])
    conventions = PromptConventions.from_info(data).to_info()
    return {
        "model": {**model, "generation": info.get("generation", {})},
        "data": {
            "template": data.get("template", "plain"),
            "system_prompt": data.get("system_prompt"),
            "max_length": int(data.get("max_length", 2048)),
            **conventions,
        },
    }
