"""Tiny random released models in their real formats, for the import / export tests.

``llava_hf`` and ``llava_onevision_hf`` folders are written by transformers' own classes
(``LlavaForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration`` and their
processors) with ``save_pretrained``. The original LLaVA and TinyLLaVA folders are written here
in those repositories' exact file layout and config fields (sources cited per builder), with
the reference composition kept as transformers modules so tests compute the reference's outputs
without any code of those repositories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGE = 32  # tower input size
PATCH = 8  # -> a 4x4 grid, 16 patches
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]

# Chat templates as the llava-hf hub repos write them (llava-1.5-7b-hf chat_template.json and
# llava-onevision-qwen2-*-hf, see /work/notes/ref_formats.md A.5 / B.5): roles upper-cased
# (LLaVA) or ChatML (OneVision), an "<image>\n" per image part before the text.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vision_config(kind: str, layers: int = 3):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    if kind == "clip":
        return CLIPVisionConfig(projection_dim=32, **sizes)
    return SiglipVisionConfig(vision_use_head=False, **sizes)


def image_processor(kind: str, **kwargs):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if kind == "clip":  # as openai/clip-vit-large-patch14-336: shortest edge + centre crop
        return CLIPImageProcessor(
            size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}, **kwargs
        )
    return SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}, **kwargs)


def language_model(family: str, out: Path, tokens: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """(tokenizer with ``tokens`` added as special tokens, text config dict sized for it)."""
    from transformers import AutoTokenizer

    from lmm.standins.llm import build_llm

    folder = build_llm(family, out)
    tok = AutoTokenizer.from_pretrained(folder)
    for token in tokens:
        tok.add_tokens([token], special_tokens=True)
    if tok.pad_token is None and family == "llama":
        tok.add_special_tokens({"pad_token": "<pad>"})
    text = json.loads((folder / "config.json").read_text())
    for key in ("architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    text["vocab_size"] = max(text["vocab_size"], -(-len(tok) // 64) * 64)
    return tok, text


def build_llava_hf(out: Path, tower: str = "clip", family: str = "llama", seed: int = 0) -> Path:
    """A ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` folder (LLaVA-1.5's settings:
    feature layer -2, strategy ``default``)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok, text = language_model(family, out / "lm", ("<image>",))
    config = LlavaConfig(
        vision_config=vision_config(tower).to_dict(),
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _perturb(model)
    model.save_pretrained(out / "hf")
    LlavaProcessor(
        image_processor=image_processor(tower),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1 if tower == "clip" else 0,
        chat_template=LLAVA_HF_CHAT_TEMPLATE,
    ).save_pretrained(out / "hf")
    return out / "hf"


def build_onevision_hf(out: Path, family: str = "qwen2", seed: int = 0) -> Path:
    """A ``LlavaOnevisionForConditionalGeneration`` + processor folder (SigLIP, layer -1,
    strategy ``full``, 32 px crops up to 3x1, budget 2 crops)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok, text = language_model(family, out / "lm", ("<image>", "<video>"))
    config = LlavaOnevisionConfig(
        vision_config=vision_config("siglip").to_dict(),
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_2",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _perturb(model)
    model.save_pretrained(out / "hf")
    half = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": IMAGE, "width": IMAGE})
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            image_grid_pinpoints=ONEVISION_PINPOINTS, **half
        ),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(**half),
        num_image_tokens=(IMAGE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    ).save_pretrained(out / "hf")
    return out / "hf"


def _perturb(model: nn.Module) -> None:
    """Move every weight off its initialisation (zero biases, unit norms, ...), so that a tensor
    mixed up on the way would change the outputs."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


@dataclass
class Reference:
    """The reference composition of an original LLaVA / TinyLLaVA checkpoint, as transformers
    modules holding its tensors: ``lm(embeds with projector(tower.hidden_states[layer][:, drop:]))``."""

    tower: nn.Module
    layer: int
    drop: int
    projector: nn.Sequential
    lm: nn.Module
    tokenizer: Any

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        return self.projector(hidden[self.layer][:, self.drop :])

    @torch.no_grad()
    def embeds(self, ids: list[int], pixels: torch.Tensor, image_index: int = -200) -> torch.Tensor:
        """LLaVA's splice (llava_arch.py prepare_inputs_labels_for_multimodal): the text
        embeddings with each ``-200`` replaced by one image's features."""
        features = self.image_features(pixels)
        table = self.lm.get_input_embeddings()
        parts, text, image = [], [], 0
        for i in ids + [None]:
            if i is None or i == image_index:
                if text:
                    parts.append(table(torch.tensor(text)))
                    text = []
                if i is not None:
                    parts.append(features[image])
                    image += 1
            else:
                text.append(i)
        return torch.cat(parts)[None]


def _reference_parts(tower_kind: str, family: str, out: Path, exact_vocab: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel

    tok, text = language_model(family, out / "lm")
    if exact_vocab:  # Vicuna's 32000 rows: no <image> row (LLaVA splices features at -200)
        text["vocab_size"] = len(tok)
    torch.manual_seed(1)
    tower = (CLIPVisionModel if tower_kind == "clip" else SiglipVisionModel)(
        vision_config(tower_kind)
    ).eval()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text)).eval()
    projector = nn.Sequential(
        nn.Linear(32, text["hidden_size"]),
        nn.GELU(),
        nn.Linear(text["hidden_size"], text["hidden_size"]),
    )
    for m in (tower, lm, projector):
        _perturb(m)
    return tok, text, tower, lm, projector


def _hf4_tower_keys(tower: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers-5 CLIP / SigLIP vision model's tensors under 4.x names (``vision_model.``),
    as checkpoints of both repositories store them."""
    return {f"vision_model.{k}": v for k, v in tower.state_dict().items()}


def build_llava_original(
    out: Path, tower_kind: str = "clip", family: str = "llama"
) -> tuple[Path, Path, Reference]:
    """(checkpoint folder, tower folder, reference) of an original LLaVA-1.5 release.

    Layout as liuhaotian/llava-v1.5-7b: ``config.json`` (fields set by haotian-liu/LLaVA
    ``llava/train/train.py`` / ``initialize_vision_modules``), ``pytorch_model-0000N-of-00002.bin``
    shards with ``pytorch_model.bin.index.json``, tokenizer files; the tower is not in it (its
    hub name in ``mm_vision_tower``), the projector is ``model.mm_projector.{0,2}``.
    """
    tok, text, tower, lm, projector = _reference_parts(tower_kind, family, out, exact_vocab=True)
    src = out / "llava-v1.5"
    src.mkdir(parents=True)
    config = {
        **{
            k: v for k, v in lm.config.to_dict().items() if k not in ("architectures", "model_type")
        },
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "mm_hidden_size": 32,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    (src / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v.clone() for k, v in projector.state_dict().items()})
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for name, keys in shards.items():
        torch.save({k: state[k] for k in keys}, src / name)
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": {k: name for name, keys in shards.items() for k in keys},
    }
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    tok.save_pretrained(src)
    tower_dir = out / "clip-vit"
    tower.save_pretrained(tower_dir)
    image_processor(tower_kind).save_pretrained(tower_dir)
    return src, tower_dir, Reference(tower, -2, 1, projector, lm, tok)


def build_tinyllava(out: Path, family: str = "phi") -> tuple[Path, Path, Reference]:
    """(checkpoint folder, vision tower folder, reference) of a TinyLLaVA_Factory release.

    Layout as tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B: ``config.json`` with the fields of
    TinyLLaVA_Factory ``tinyllava/model/configuration_tinyllava.py`` ``TinyLlavaConfig`` (as
    ``save_pretrained`` writes them: ``text_config`` / ``vision_config`` as dicts), weights
    ``language_model.*`` / ``vision_tower._vision_tower.vision_model.*`` /
    ``connector._connector.{0,2}.*`` (``modeling_tinyllava.py``, ``connector/mlp.py``) in two
    safetensors shards with ``model.safetensors.index.json``, tokenizer files; no image
    processor (the Factory takes it from ``vision_model_name_or_path``).
    """
    from safetensors.torch import save_file

    tok, text, tower, lm, projector = _reference_parts("siglip", family, out)
    src = out / "TinyLLaVA"
    src.mkdir(parents=True)
    vision = {
        **tower.config.to_dict(),
        "model_name_or_path": "google/siglip-so400m-patch14-384",
        "model_name_or_path2": "",
    }
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration.TinyLlavaConfig",
            "AutoModelForCausalLM": "modeling_tinyllava_phi.TinyLlavaForConditionalGeneration",
        },
        "cache_dir": None,
        "connector_type": "mlp2x_gelu",
        "hidden_size": text["hidden_size"],
        "ignore_index": -100,
        "image_aspect_ratio": "square",
        "image_token_index": -200,
        "llm_model_name_or_path": "microsoft/phi-2",
        "model_type": "tinyllava",
        "num_queries": 128,
        "num_resampler_layers": 3,
        "pad_token": tok.eos_token,
        "pad_token_id": tok.eos_token_id,
        "resampler_hidden_size": 768,
        "text_config": {**lm.config.to_dict(), "model_type": lm.config.model_type},
        "tokenizer_model_max_length": 3072,
        "tokenizer_name_or_path": "microsoft/phi-2",
        "tokenizer_padding_side": "right",
        "tokenizer_use_fast": False,
        "tune_type_connector": "full",
        "tune_type_llm": "full",
        "tune_type_vision_tower": "frozen",
        "tune_vision_tower_from_layer": 0,
        "use_cache": True,
        "vision_config": vision,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch",
        "vision_hidden_size": 32,
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "vision_model_name_or_path2": "",
        "vocab_size": text["vocab_size"],
    }
    (src / "config.json").write_text(json.dumps(config, indent=2))
    state = {f"language_model.{k}": v for k, v in lm.state_dict().items()}
    state.update({f"vision_tower._vision_tower.{k}": v for k, v in _hf4_tower_keys(tower).items()})
    state.update({f"connector._connector.{k}": v for k, v in projector.state_dict().items()})
    state = {k: v.clone().contiguous() for k, v in state.items()}
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for name, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(src / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {k: n for n, ks in shards.items() for k in ks},
    }
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok.save_pretrained(src)
    tower_dir = out / "siglip"
    tower.save_pretrained(tower_dir)
    image_processor("siglip", image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tower_dir)
    return src, tower_dir, Reference(tower, -2, 1, projector, lm, tok)
