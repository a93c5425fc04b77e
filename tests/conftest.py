"""Shared fixtures: tiny random-init models and a tiny synthetic world, built once per session.

Everything is built locally (no network): a 2-layer SigLIP tower (32 px images, 8 px patches
-> 16 tokens per image) and a 2-layer Llama with a byte-level BPE tokenizer.
"""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one intra-op thread is fastest and does not fight other processes for cores.
torch.set_num_threads(1)

from lmm.standins.tiny import TinySpec  # noqa: E402

# Sizes chosen so every test runs in well under a second of model compute.
TINY_SPEC = TinySpec(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    llm_width=32,
    llm_layers=2,
    llm_heads=2,
    vocab_size=640,
    max_positions=256,
    seed=0,
)
TOKENS_PER_IMAGE = (TINY_SPEC.image_size // TINY_SPEC.patch_size) ** 2  # 16


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

WORLD_KW = dict(
    train_images=64, val_images=8, test_images=8, samples_per_shard=16, eval_samples_per_shard=16
)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """``{"vision": dir, "llm": dir}`` written with ``save_pretrained``."""
    from lmm.standins.tiny import build_tiny_models
    from lmm.worlds.shapes.tiny import tiny_corpus

    out = tmp_path_factory.mktemp("tiny_models")
    return build_tiny_models(out, tiny_corpus(), TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> tuple[Path, dict]:
    """(directory, manifest) of a small shapes world: 4 pretrain + 4 finetune shards of 16."""
    from lmm.worlds.shapes.config import WorldConfig
    from lmm.worlds.shapes.writer import write_world

    out = tmp_path_factory.mktemp("tiny_world")
    manifest = write_world(out, WorldConfig(**WORLD_KW), num_workers=1, progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def tokenizer(tiny_models):
    from lmm.model.language import LanguageConfig, load_tokenizer

    return load_tokenizer(LanguageConfig(name_or_path=str(tiny_models["llm"])))


@pytest.fixture(scope="session")
def image_spec(tiny_models):
    from lmm.visual.image_spec import ImageSpec

    return ImageSpec.from_pretrained(
        str(tiny_models["vision"]), "siglip_vision_model", TINY_SPEC.image_size
    )


def make_processor(tokenizer, image_spec, num_image_tokens: int = TOKENS_PER_IMAGE):
    from lmm.data.encode import Processor

    return Processor(
        tokenizer, image_spec, num_image_tokens, tokenizer.convert_tokens_to_ids("<image>")
    )


@pytest.fixture(scope="session")
def _session_lmm(tiny_models):
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM
    from lmm.model.towers import VisionConfig

    torch.manual_seed(0)
    model = LMM(
        VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        LanguageConfig(name_or_path=str(tiny_models["llm"])),
        connector="mlp2x_gelu",
    )
    return model.eval()


@pytest.fixture(scope="session")
def lmm_model(_session_lmm):
    """The shared model; tests must not change it (use ``fresh_lmm`` to mutate)."""
    return _session_lmm


@pytest.fixture
def fresh_lmm(_session_lmm):
    """A private copy of the session model (parameters, requires_grad and mode may be changed)."""
    return copy.deepcopy(_session_lmm)


def image_text_batch(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-sample (ids, mask, labels, pixels) batch with one image each, the second row padded."""
    n = TOKENS_PER_IMAGE
    ids = torch.tensor(
        [
            [1] + [model.image_token_id] * n + [40, 41, 42, 43, 2],
            [1] + [model.image_token_id] * n + [50, 51, 2, 3, 3],
        ]
    )
    mask = torch.tensor([[1] * (n + 6), [1] * (n + 4) + [0, 0]])
    labels = ids.clone()
    labels[:, : n + 2] = -100  # image span and the first text token are not supervised
    labels[mask == 0] = -100
    pv = torch.randn(
        2, 3, TINY_SPEC.image_size, TINY_SPEC.image_size, generator=torch.Generator().manual_seed(0)
    )
    return ids, mask, labels, pv


def png_bytes(color=(200, 30, 30), size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")
