"""The causal language model and its tokenizer, loaded through AutoModelForCausalLM / AutoTokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmm.constants import IMAGE_TOKEN
from lmm.model.loading import load_pretrained


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
    """The LM's tokenizer with ``<image>`` as a special token and a pad token set.

    Pad token per family: Qwen2 (``<|endoftext|>``) and Gemma (``<pad>``) bring their own;
    Llama/TinyLlama gets ``<unk>``; Phi-2 and StableLM-2, whose only special token is
    ``<|endoftext|>`` (= eos = unk), pad with it. Reusing an existing token is safe because
    padding is never found by its id: attention masks come from sequence lengths
    (``lmm.data.collate``) and padded labels are ``IGNORE_INDEX``, so a pad id equal to eos
    neither hides real eos tokens from attention nor from the loss.
    """
    from transformers import AutoTokenizer

    tok = load_pretrained(
        AutoTokenizer, cfg.name_or_path, "tokenizer", trust_remote_code=cfg.trust_remote_code
    )
    return prepare_tokenizer(tok, cfg.name_or_path)


def prepare_tokenizer(tok, name: str):
    """``tok`` (loaded from ``name``) with ``<image>`` as a special token and a pad token set."""
    if tok.eos_token is None:
        raise ValueError(f"tokenizer of {name!r} has no eos token; conversation turns need one")
    if IMAGE_TOKEN not in tok.get_vocab():
        add_special_token(tok, IMAGE_TOKEN)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def add_special_token(tok, token: str) -> None:
    """Add ``token`` as a special token. The tokenizer's other extra special tokens (e.g. Qwen2's
    ``<|im_start|>``, Gemma's ``<start_of_turn>``) are kept, not replaced, so they stay special
    for decoding."""
    tok.add_special_tokens({"additional_special_tokens": [*_extra_special_tokens(tok), token]})


def _extra_special_tokens(tok) -> list[str]:
    """Special tokens beyond bos/eos/unk/pad/...: ``extra_special_tokens`` in transformers 5,
    ``additional_special_tokens`` in 4.x (where ``extra_special_tokens`` is a dict of names)."""
    extra = getattr(tok, "extra_special_tokens", None)
    if not isinstance(extra, (list, tuple)):
        extra = getattr(tok, "additional_special_tokens", None) or []
    return [str(t) for t in extra]


def load_language_model(
    cfg: LanguageConfig, tokenizer, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The causal LM, with embedding rows for every tokenizer id (``<image>`` included)."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(
        AutoModelForCausalLM,
        cfg.name_or_path,
        "language model",
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
    )
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # Llama/TinyLlama and Gemma have one row per token, so <image> needs a new row; rounded
        # up to a multiple for matmul efficiency. Tied heads (Gemma, small Qwen2) stay tied.
        # Phi-2, StableLM-2 and Qwen2 ship spare rows and are left as they are.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=cfg.pad_to_multiple_of)
    return model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (for partial freezing)."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {count} decoder layers found")
