"""The tiny pipeline's world (``python -m lmm tiny``) and the text its tokenizer is trained on."""

from __future__ import annotations

from lmm.worlds.shapes.config import WorldConfig

# The tiny world. Enough distinct train images that each is seen about once per stage:
# with fewer, a from-scratch model memorises images by their easy features (colour,
# layout) instead of learning shapes. Each question is its own sample with the question
# before the image, as at test time, so the image tokens can attend to it (in a whole
# conversation only the first question is). Existence questions come in Yes/No pairs per
# image, so neither the kind nor the image alone predicts the answer; rare kinds are less rare;
# shape and position questions are weighted up. Captions group the objects by kind, so stage 1
# already teaches which kinds are present and finding an object by its kind.
# docs/experiments/tiny.md has the runs behind each choice.
TINY_WORLD = WorldConfig(
    train_images=40000,
    size_range=(0.7, 0.9),
    shape_weights=(2.0, 1.8, 1.6, 1.4, 1.2, 1.0),
    category_weights=(1, 2, 1, 1.5, 3),
    min_turns=3,
    max_turns=6,
    image_after_question=True,
    balanced_exist=True,
    turns_per_sample=1,
    caption_style="kinds",
)


def tiny_corpus() -> list[str]:
    """Every text the tiny world and the chat template can produce."""
    from lmm.data.templates import TEMPLATES
    from lmm.worlds.shapes.corpus import world_corpus

    system = TEMPLATES.get("vicuna").system
    return world_corpus() + [f"{system} USER: ASSISTANT:"] * 20
