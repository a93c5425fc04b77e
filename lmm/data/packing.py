"""Sequence packing: a batch's samples laid end to end in as few rows as fit a token budget.

Each sample keeps its own positions (restarting at 0) and its own causal attention block
(the model derives the blocks from where the position ids restart), so a packed batch gives
every sample the same loss as a padded one while computing far fewer padding tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from lmm.constants import IGNORE_INDEX
from lmm.data.collate import collate
from lmm.visual.image_batch import cat_pixels


def assign_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row's total length <= ``budget``.

    Rows are returned in order of their first (longest) sample; within a row, samples keep
    the order they were placed in. A sample longer than the budget gets a row of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(budget - lengths[i])
    return rows


def choose_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """The packing of ``lengths`` into rows of at most ``budget`` tokens that computes the
    fewest tokens (rows x widest row). Row capacities from the longest sample up to the
    budget, in steps of the longest sample, are tried: one long row of many short samples
    can cost more than a few rows as wide as the longest sample."""
    longest = max(lengths)
    best: tuple[int, int, list[list[int]]] | None = None
    capacity = longest
    while True:
        rows = assign_rows(lengths, max(capacity, 1))
        width = max(sum(lengths[i] for i in r) for r in rows)
        cost = (len(rows) * width, width)
        if best is None or cost < best[:2]:
            best = (*cost, rows)
        if capacity >= budget:
            return best[2]
        capacity = min(budget, capacity + longest)


def pack(samples: list[dict[str, Any]], pad_id: int, budget: int) -> dict[str, Any]:
    """Training samples -> a packed batch (rows chosen by :func:`choose_rows`).

    Keys as :func:`lmm.data.collate.collate` (``ids`` and ``size`` in the original sample
    order) plus ``position_ids`` (restarting per sample; the padded tail of a row counts on
    as a block of its own) and ``sample_index`` (which sample each position holds, -1 for
    padding). ``pixel_values`` follow the packed order of the ``<image>`` spans."""
    if not samples:
        return collate(samples, pad_id)
    if budget < 1:
        raise ValueError(f"data.pack_length must be >= 1, got {budget}")
    rows = choose_rows([len(s["input_ids"]) for s in samples], budget)
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=samples[0]["input_ids"].dtype)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=samples[0]["labels"].dtype)
    attention = torch.zeros((n_rows, width), dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    sample_index = torch.full((n_rows, width), -1, dtype=torch.long)
    pixels = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = samples[i]
            n = len(s["input_ids"])
            input_ids[r, at : at + n] = s["input_ids"]
            labels[r, at : at + n] = s["labels"]
            # A sample's first token is never a target of its own; without this it would be
            # "predicted" from the previous sample's last token.
            labels[r, at] = IGNORE_INDEX
            attention[r, at : at + n] = 1
            position_ids[r, at : at + n] = torch.arange(n)
            sample_index[r, at : at + n] = i
            pixels.append(s["pixel_values"])
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {
        "size": len(samples),
        "ids": [s["id"] for s in samples],
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "position_ids": position_ids,
        "sample_index": sample_index,
        "pixel_values": cat_pixels(pixels),
    }
