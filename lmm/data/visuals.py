"""A sample's images -> what each ``<image>`` stands for (:class:`Visual`) and its tower inputs,
when the model sets ``model.vision.anyres`` or ``model.vision.video``.

- A sample with one image: ``single`` (AnyRes: the base view, then the crops row-major).
- A sample with several images: each ``multi``, one view each (with AnyRes, prepared by
  ``anyres.multi_image_preprocess``: OneVision pads them to a square).
- A sample whose json says ``"modality": "video"``: its images are the frames of one clip
  (member-name order) behind a single ``<image>``; more than ``max_frames`` are sampled
  uniformly.
"""

from __future__ import annotations

import torch
from PIL import Image

from lmm.data.image import ImageTransform, to_rgb
from lmm.errors import SampleError
from lmm.visual.anyres import anyres_map, fit_in_canvas
from lmm.visual.layout import Visual, VisualLayout
from lmm.visual.video import frame_indices

MODALITIES: tuple[str, ...] = ("image", "video")


def modality_of(meta: dict) -> str:
    """The sample's json ``modality`` (default ``image``), checked."""
    modality = meta.get("modality", "image")
    if modality not in MODALITIES:
        raise SampleError(
            "malformed",
            f"sample {meta['id']!r}: unknown modality {modality!r}; known: {', '.join(MODALITIES)}",
        )
    return modality


def video_unsupported(meta: dict) -> SampleError:
    return SampleError(
        "malformed",
        f"sample {meta['id']!r} is a video (json modality) but model.vision.video is not set",
    )


def placeholders(
    meta: dict, images: list[Image.Image], layout: VisualLayout
) -> list[tuple[Visual, list[Image.Image]]]:
    """Each ``<image>`` placeholder's :class:`Visual` and its images (a video: the kept frames)."""
    if modality_of(meta) == "video":
        if layout.video is None:
            raise video_unsupported(meta)
        if not images:
            raise SampleError("image_count", f"sample {meta['id']!r}: a video without frames")
        frames = [images[i] for i in frame_indices(len(images), layout.video.max_frames)]
        return [(Visual("video", *frames[0].size, frames=len(frames)), frames)]
    kind = "single" if len(images) == 1 else "multi"
    return [(Visual(kind, *img.size), [img]) for img in images]


def anyres_crops(
    img: Image.Image, grid: tuple[int, int], tile: int, fill: tuple[int, int, int]
) -> list[Image.Image]:
    """An RGB image resized into the grid's canvas (aspect kept, centred on ``fill``), cut into
    ``tile x tile`` crops, row-major."""
    rows, cols = grid
    new_w, new_h, left, top = fit_in_canvas(img.width, img.height, cols * tile, rows * tile)
    canvas = Image.new("RGB", (cols * tile, rows * tile), fill)
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.BICUBIC), (left, top))
    return [
        canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]


BLACK = (0, 0, 0)


def tiles(
    v: Visual,
    images: list[Image.Image],
    layout: VisualLayout,
    transform: ImageTransform,
    blank: bool = False,
) -> torch.Tensor:
    """``[layout.tiles(v), 3, S, S]``: the tower inputs of one placeholder."""
    if blank:
        return torch.stack([transform.blank() for _ in range(layout.tiles(v))])
    anyres = layout.anyres
    if v.kind == "multi" and anyres is not None and anyres.multi_image_preprocess is not None:
        transform = transform.variant(anyres.multi_image_preprocess)
    views = [transform(img) for img in images]  # base views (a video's frames)
    if v.kind == "single" and anyres is not None:
        spec = transform.spec
        grid = anyres_map(v.width, v.height, layout.unit, layout.tile, anyres).grid
        fill = BLACK if anyres.crop_fill == "black" else spec.fill
        crops = anyres_crops(to_rgb(images[0], background=spec.fill), grid, layout.tile, fill)
        views += [transform.normalise(c) for c in crops]
    return torch.stack(views)
