"""Figures for TensorBoard: images with question, reference and generated answer."""

from __future__ import annotations

import textwrap

import torch
from matplotlib.figure import Figure

from lmm.visual.image_batch import ImageBatch
from lmm.visual.image_spec import ImageSpec


def denormalise(pixels: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """``[C, H, W]`` normalised -> ``[H, W, 3]`` in [0, 1] (a fused tower's input: its first view)."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (pixels[:3].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def examples_figure(
    batch: dict,
    records: list[dict],
    spec: ImageSpec,
    tokens_per_image: int,
    image_token_id: int,
    limit: int = 8,
):
    """A grid of each sample's first image titled with Q / reference / generated answer (an
    ``ImageBatch`` shows each sample's first tower input: a base view or a video's first frame)."""
    pv = batch["pixel_values"]
    if isinstance(pv, ImageBatch):
        per_row, pixels = torch.tensor(pv.row_tiles), pv.pixels  # tower inputs per sample
    else:
        per_row, pixels = (batch["input_ids"] == image_token_id).sum(dim=1) // tokens_per_image, pv
    first = torch.cumsum(per_row, 0) - per_row
    shown = [i for i in range(len(records)) if per_row[i] > 0][:limit]
    cols = min(4, max(1, len(shown)))
    rows = max(1, (len(shown) + cols - 1) // cols)
    # A bare Figure renders without pyplot, so importing this never changes a notebook's backend.
    fig = Figure(figsize=(3.2 * cols, 4.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(denormalise(pixels[int(first[i])], spec).numpy(), interpolation="nearest")
        r = records[i]
        q = r["question"].replace("<image>", "").strip()
        ok = "✓" if r.get("correct") else ""
        ax.set_title(
            textwrap.fill(f"Q: {q}", 34) + f"\nref: {r['answer']}\nout: {r['text'][:40]} {ok}",
            fontsize=7,
        )
    fig.tight_layout()
    return fig
