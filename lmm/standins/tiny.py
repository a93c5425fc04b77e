"""Tiny random-init stand-ins of real architectures, saved with ``save_pretrained``.

They are loaded back through exactly the code path a hub name takes (``from_pretrained``
on a directory), so CPU runs and tests exercise the real loading code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


@dataclass
class TinySpec:
    """Sizes of the tiny tower and LM.

    Args:
        image_size: Input resolution of the tower.
        patch_size: ViT patch size (image_size / patch_size tokens per side).
        vision_width: Tower hidden size.
        vision_layers: Tower layers.
        vision_heads: Tower attention heads.
        llm_width: LM hidden size.
        llm_layers: LM decoder layers.
        llm_heads: LM attention heads.
        vocab_size: BPE vocabulary size (multiple of 64).
        max_positions: LM context length.
        seed: Seed of the random initialisation.
    """

    image_size: int = 48
    # Four patches per cell of the shapes world's 3x3 grid. The tiny configs' pixel_shuffle
    # connector joins each cell's 2x2 patches into one LM token, so every object is still one
    # token that a question can find by attention. With one 16-px patch per cell, the tower
    # learned colours but named barely half the shapes after stage 1 (see docs/experiments/tiny.md).
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    llm_width: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    vocab_size: int = 640
    max_positions: int = 512
    seed: int = 0


def build_tiny_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``corpus``, wrapped as a transformers fast tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )


def build_tiny_models(
    out_dir: str | Path, corpus: list[str], spec: TinySpec = TinySpec()
) -> dict[str, Path]:
    """Write ``out_dir/vision`` (SiglipVisionModel + preprocessor config) and ``out_dir/llm``
    (LlamaForCausalLM + tokenizer). Idempotent: models built from the same spec are kept,
    models from another spec or tokenizer corpus are rebuilt."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    out = Path(out_dir)
    paths = {"vision": out / "vision", "llm": out / "llm"}
    record = out / "tiny_spec.json"
    wanted = {
        **asdict(spec),
        "corpus_sha256": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
    }
    if record.exists() and json.loads(record.read_text()) != wanted:
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(spec.seed)
    if not (paths["vision"] / "config.json").exists():
        cfg = SiglipVisionConfig(
            hidden_size=spec.vision_width,
            intermediate_size=4 * spec.vision_width,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            vision_use_head=False,
        )
        SiglipVisionModel(cfg).save_pretrained(paths["vision"])
        SiglipImageProcessor(
            size={"height": spec.image_size, "width": spec.image_size},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        ).save_pretrained(paths["vision"])
    if not (paths["llm"] / "config.json").exists():
        tokenizer = build_tiny_tokenizer(corpus, spec.vocab_size)
        cfg = LlamaConfig(
            vocab_size=-(-len(tokenizer) // 64) * 64,
            hidden_size=spec.llm_width,
            intermediate_size=int(spec.llm_width * 8 / 3) // 8 * 8,
            num_hidden_layers=spec.llm_layers,
            num_attention_heads=spec.llm_heads,
            num_key_value_heads=spec.llm_heads,
            max_position_embeddings=spec.max_positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(cfg).save_pretrained(paths["llm"])
        tokenizer.save_pretrained(paths["llm"])
    record.write_text(json.dumps(wanted))
    return paths
