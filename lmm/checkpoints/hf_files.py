"""Files of a Hugging Face LLaVA / OneVision export that transformers 4.x and 5.x both read.

transformers 5 names a LLaVA model's tensors ``model.language_model.*``, ``lm_head.*``,
``model.vision_tower.*`` (its CLIP / SigLIP vision classes have no ``vision_model`` submodule)
and, when it saves a model it did not load, writes ``language_model.model.*`` with
``vision_tower.embeddings.*``. transformers 4.x's CLIP / SigLIP classes do have
``vision_model``, so they would report that tower missing and initialise it randomly. The
llava-hf hub layout (``language_model.model.*``, ``language_model.lm_head.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``) is what both
read: 4.x maps it onto its modules (``_checkpoint_conversion_mapping``) or has it as its own
names (before 4.52), and 5.x converts it on load (``conversion_mapping.py``: the ``llava`` /
``llava_next`` renames and the ``CLIPVisionModel`` prefix change). The export writes that
layout itself.

Tokenizer: transformers 5 writes ``tokenizer_class: TokenizersBackend`` (a 5.x-only class) or
a family class that 4.x rebuilds from files the export does not have, and
``extra_special_tokens`` as a list (4.x reads a dict there and fails); the export writes
``PreTrainedTokenizerFast`` (5.x's ``TokenizersBackend`` under its 4.x name), which reads
``tokenizer.json`` as it is, and ``additional_special_tokens``. Text configs get 4.x's
``rope_theta`` / ``rope_scaling`` / ``torch_dtype`` beside 5.x's ``rope_parameters`` / ``dtype``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# transformers 5 in-memory prefix -> llava-hf hub prefix (order: the first match wins).
_HUB_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


def write_safetensors(state: dict[str, torch.Tensor], folder: Path) -> None:
    """``state`` as ``model.safetensors`` (or 5 GB shards with an index, as transformers writes)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state)
    for filename, keys in split.filename_to_tensors.items():
        tensors = {k: state[k].detach().contiguous() for k in keys}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def hub_key(key: str) -> str:
    """A transformers-5 key of a LLaVA / OneVision model in the llava-hf hub layout."""
    for native, hub in _HUB_PREFIXES:
        if key.startswith(native):
            return hub + key[len(native) :]
    raise KeyError(f"{key!r} is not a LLaVA model key")


def write_hub_weights(state: dict[str, torch.Tensor], out: Path) -> None:
    """``state`` (transformers-5 names) as safetensors in the llava-hf hub layout."""
    write_safetensors({hub_key(k): v for k, v in state.items()}, out)


def _portable_text_config(text: dict) -> dict:
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        text.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            text.setdefault("rope_scaling", rope)
    if "dtype" in text:
        text.setdefault("torch_dtype", text["dtype"])
    return text


def make_portable(out: Path) -> None:
    """Rewrite the config and tokenizer files transformers 5 wrote in ``out`` so that 4.x reads
    them too (fields 5.x ignores are added, none it reads is changed)."""
    config_file = out / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = _portable_text_config(config["text_config"])
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    tok_file = out / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    if (out / "tokenizer.json").is_file():
        # The family classes rebuild parts of the tokenizer in 4.x (LlamaTokenizerFast converts
        # from the slow SentencePiece model when add_prefix_space is set, which needs a
        # tokenizer.model); the generic class reads tokenizer.json as it is, in 4.x and 5.x.
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tok.get("extra_special_tokens")
    if isinstance(extra, list):
        tok["additional_special_tokens"] = tok.pop("extra_special_tokens")
    tok_file.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def state_mismatch(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` differs from the tensors a transformers class declares (``expected``):
    the missing and unexpected keys (sorted), and the shared keys whose shapes differ."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, bad
