"""The images of a batch whose placeholders take varying numbers of tokens (AnyRes,
multi-image, video): every tower input of the batch plus what each placeholder stands for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from lmm.visual.layout import Visual


@dataclass
class ImageBatch:
    """What ``pixel_values`` is when ``model.vision.anyres`` or ``model.vision.video`` is set.

    A plain tensor stays the format without them. Lightning moves an ``ImageBatch`` to the
    device through :meth:`to`, like a tensor.

    Attributes:
        pixels: ``[tiles, 3, S, S]``: every placeholder's tiles in order (AnyRes: the base view,
            then the crops row-major; video: the frames).
        items: Per sample (batch row), the :class:`Visual` of each of its placeholders, in order.
        row_tiles: Per sample, how many of ``pixels`` it brought.
    """

    pixels: torch.Tensor
    items: tuple[tuple[Visual, ...], ...]
    row_tiles: tuple[int, ...]

    @classmethod
    def of_sample(cls, pixels: torch.Tensor, visuals: list[Visual]) -> "ImageBatch":
        return cls(pixels, (tuple(visuals),), (pixels.shape[0],))

    @classmethod
    def cat(cls, batches: list["ImageBatch"]) -> "ImageBatch":
        """Samples (or batches) one after the other, as ``torch.cat`` joins plain pixels."""
        return cls(
            torch.cat([b.pixels for b in batches]),
            tuple(row for b in batches for row in b.items),
            tuple(n for b in batches for n in b.row_tiles),
        )

    def to(self, *args, **kwargs) -> "ImageBatch":
        return ImageBatch(self.pixels.to(*args, **kwargs), self.items, self.row_tiles)

    def pin_memory(self) -> "ImageBatch":
        """What a DataLoader with ``pin_memory`` calls (as on a tensor)."""
        return ImageBatch(self.pixels.pin_memory(), self.items, self.row_tiles)

    @property
    def visuals(self) -> list[Visual]:
        """Every placeholder of the batch, in sequence order."""
        return [v for row in self.items for v in row]


PixelValues = Union[torch.Tensor, ImageBatch]


def tower_inputs(pixel_values: Optional[PixelValues]) -> Optional[torch.Tensor]:
    """The ``[tiles, 3, S, S]`` tensor behind ``pixel_values`` (None stays None)."""
    return pixel_values.pixels if isinstance(pixel_values, ImageBatch) else pixel_values


def cat_pixels(items: list[PixelValues]) -> PixelValues:
    """Join samples' ``pixel_values`` in order (plain tensors or :class:`ImageBatch`)."""
    if items and isinstance(items[0], ImageBatch):
        return ImageBatch.cat(items)
    return torch.cat(items)
