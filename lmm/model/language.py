"""The causal language model and its tokenizer, loaded through AutoModelForCausalLM / AutoTokenizer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmm.model.loading import load_pretrained

IMAGE_TOKEN = "<image>"


@dataclass
class LanguageConfig:
    """Which language model to build.

    Args:
        name_or_path: Hub name or local directory of the causal LM and its tokenizer.
        trust_remote_code: Allow the checkpoint's own Python code to run (off: configs are data).
        pad_to_multiple_of: Embedding rows are padded to a multiple of this after adding ``<image>``.
    """

    name_or_path: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    trust_remote_code: bool = False
    pad_to_multiple_of: int = 64


def load_tokenizer(cfg: LanguageConfig):
    """The LM's tokenizer with ``<image>`` as a special token and a pad token set."""
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer, cfg.name_or_path, "tokenizer", trust_remote_code=cfg.trust_remote_code)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        # Padding is always masked out of attention and loss, so any existing token will do.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.eos_token is None:
        raise ValueError(f"tokenizer of {cfg.name_or_path!r} has no eos token; conversation turns need one")
    return tok


def load_language_model(cfg: LanguageConfig, tokenizer, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM, with embedding rows for every tokenizer id (``<image>`` included)."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(
        AutoModelForCausalLM,
        cfg.name_or_path,
        "language model",
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
    )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=cfg.pad_to_multiple_of)
    return model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (for partial freezing)."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {count} decoder layers found")
