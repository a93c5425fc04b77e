"""Everything one image contributes to the shards: the training samples, or the held-out questions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lmm.constants import IMAGE_TOKEN
from lmm.worlds.shapes.config import DESCRIBE_QUESTION, PRETRAIN_PROMPT, WorldConfig, WorldObject
from lmm.worlds.shapes.pope import pope_questions
from lmm.worlds.shapes.scene import image_rng, png_bytes, render, sample_objects
from lmm.worlds.shapes.text import (
    make_caption,
    make_conversation,
    short_answer_questions,
)

CAPTION_SPLIT = "test/caption"


def with_image(cfg: WorldConfig, question: str) -> str:
    """The first human turn: the question with the image placeholder before or after it."""
    return (
        f"{question}\n{IMAGE_TOKEN}" if cfg.image_after_question else f"{IMAGE_TOKEN}\n{question}"
    )


def _conversation_json(cfg: WorldConfig, turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA schema; the image placeholder is in the first human turn only."""
    conv: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(turns):
        conv.append({"from": "human", "value": with_image(cfg, question) if i == 0 else question})
        conv.append({"from": "gpt", "value": answer})
    return conv


def json_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


Sample = tuple[str, str, bytes, bytes]
"""A sample ready to write: ``(output_split, key, png, json_bytes)``."""


def train_image_samples(cfg: WorldConfig, index: int) -> tuple[list[WorldObject], list[Sample]]:
    """Pretrain + finetune samples of train image ``index`` (runs in worker processes)."""
    objects = sample_objects(cfg, image_rng(cfg, "train", index, 0))
    png = png_bytes(render(cfg, objects))
    text_rng = image_rng(cfg, "train", index, 1)
    caption = make_caption(cfg, objects, text_rng)
    turns = make_conversation(cfg, objects, caption, text_rng)
    key = f"train-{index:06d}"
    objs = [o.to_json(cfg.grid) for o in objects]
    base = {"id": key, "image": f"{key}.png"}
    pretrain = {
        **base,
        "conversations": _conversation_json(cfg, [(PRETRAIN_PROMPT, caption)]),
        "objects": objs,
    }
    samples = [("pretrain", key, png, json_bytes(pretrain))]
    step = cfg.turns_per_sample or max(1, len(turns))
    for j in range(0, len(turns), step):
        part = turns[j : j + step]
        part_key = f"{key}-t{j:02d}" if cfg.turns_per_sample else key
        finetune = {
            "id": part_key,
            "image": f"{part_key}.png",
            "conversations": _conversation_json(cfg, [(q, a) for q, a, _ in part]),
            "categories": [c for _, _, c in part],
            "objects": objs,
        }
        samples.append(("finetune", part_key, png, json_bytes(finetune)))
    return objects, samples


def eval_image_samples(
    cfg: WorldConfig, split: str, stats: dict[str, Any], index: int
) -> list[Sample]:
    """Single-question samples of val/test image ``index`` (``question_id`` is filled in later)."""
    objects = sample_objects(cfg, image_rng(cfg, split, index, 0))
    png = png_bytes(render(cfg, objects))
    text_rng = image_rng(cfg, split, index, 1)
    image_id = f"{split}-{index:06d}"
    objs = [o.to_json(cfg.grid) for o in objects]
    short = short_answer_questions(cfg, objects, text_rng, index, cfg.short_questions_per_image)
    if split == "val":
        pope = pope_questions(
            cfg, objects, stats, text_rng, cfg.val_pope_pairs_per_image, ("random",)
        )
        groups = {
            "val": [(q, a, c) for q, a, c in short] + [(q, a, "pope") for q, a in pope["random"]]
        }
    else:
        pope = pope_questions(cfg, objects, stats, text_rng, cfg.pope_positives)
        groups = {"test/short_answer": list(short)}
        groups.update(
            {f"test/pope_{s}": [(q, a, "pope") for q, a in items] for s, items in pope.items()}
        )
        if index < cfg.caption_test_images:
            # Its own text stream: the other splits' texts stay as they were without it.
            caption = make_caption(cfg, objects, image_rng(cfg, split, index, 2))
            groups[CAPTION_SPLIT] = [(DESCRIBE_QUESTION, caption, "describe")]
    samples: list[Sample] = []
    for out_split, items in groups.items():
        for j, (question, answer, category) in enumerate(items):
            key = f"{image_id}-q{j:02d}"
            record: dict[str, Any] = {
                "id": key,
                "question_id": None,
                "image_id": image_id,
                "image": f"{key}.png",
            }
            if category == "pope":
                record.update(text=question, label=answer)
            record.update(
                conversations=[{"from": "human", "value": with_image(cfg, question)}],
                answer=answer,
                category=category,
                objects=objs,
            )
            if category == "describe":  # CHAIR's ground truth: the kinds in the image
                record["gt_objects"] = [s for s in cfg.shapes if any(o.shape == s for o in objects)]
            samples.append((out_split, key, png, json_bytes(record)))
    return samples
