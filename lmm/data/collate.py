"""Padding encoded samples into batches: right padding for training, left for generation."""

from __future__ import annotations

from typing import Any

import torch

from lmm.constants import IGNORE_INDEX
from lmm.visual.image_batch import cat_pixels


def _pad(seqs: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=seqs[0].dtype)
    for row, s in enumerate(seqs):
        if left:
            out[row, width - len(s) :] = s
        else:
            out[row, : len(s)] = s
    return out


def collate(samples: list[dict[str, Any]], pad_id: int, left: bool = False) -> dict[str, Any]:
    """Stack samples; ``pixel_values`` concatenates every sample's images in sample order,
    which is the order their ``<image>`` spans appear in the padded batch (an ``ImageBatch``
    when the samples carry one: AnyRes, multi-image, video)."""
    if not samples:
        return {"size": 0, "ids": []}
    ids = [s["input_ids"] for s in samples]
    batch: dict[str, Any] = {
        "size": len(samples),
        "ids": [s["id"] for s in samples],
        "input_ids": _pad(ids, pad_id, left),
        "attention_mask": _pad([torch.ones_like(i) for i in ids], 0, left),
        "pixel_values": cat_pixels([s["pixel_values"] for s in samples]),
    }
    if "labels" in samples[0]:
        batch["labels"] = _pad([s["labels"] for s in samples], IGNORE_INDEX, left)
    if "meta" in samples[0]:
        batch["meta"] = [s["meta"] for s in samples]
    if "order" in samples[0]:
        batch["order"] = [s["order"] for s in samples]
    return batch
