"""Pixel-shuffle (space-to-depth) connector: ``r x r`` neighbouring patch tokens become one
token of ``r*r`` times the width, then an MLP maps it to the LM width. The LM sees ``r**2``
times fewer image tokens while no feature is averaged away (Idefics3 / InternVL style)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmm.errors import ConfigError
from lmm.model.connectors.mlp import make_mlp, square_side


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, side*side, D]`` row-major tokens -> ``[B, (side/factor)^2, factor^2 * D]``: output token
    ``(i, j)`` is input tokens ``(i*factor + a, j*factor + b)`` side by side, ``a, b`` row-major."""
    b, n, d = x.shape
    s, r = math.isqrt(n) // factor, factor
    # [B, s*r*s*r, D] -> [B, s, r, s, r, D] -> [B, s, s, r, r, D] -> [B, s*s, r*r*D]
    return x.reshape(b, s, r, s, r, d).permute(0, 1, 3, 2, 4, 5).reshape(b, s * s, r * r * d)


class PixelShuffleMLP(nn.Module):
    """Space-to-depth by ``factor`` on the square token grid, then a GELU MLP of ``mlp_depth`` layers.

    Output token ``(i, j)`` (row-major over the ``side/factor`` grid) is the concatenation of
    input tokens ``(i*factor + a, j*factor + b)`` for ``a, b`` in row-major order.
    """

    def __init__(
        self, vision_dim: int, text_dim: int, num_tokens: int, factor: int = 2, mlp_depth: int = 2
    ) -> None:
        super().__init__()
        if factor < 1:
            raise ConfigError(f"model.connector.factor must be >= 1, got {factor}")
        side = square_side(num_tokens, "pixel_shuffle")
        if side % factor:
            divisors = [k for k in range(2, side + 1) if side % k == 0]
            raise ConfigError(
                f"model.connector: pixel_shuffle factor {factor} does not divide the {side}x{side} token grid "
                f"({num_tokens} tokens); factors that do: {', '.join(map(str, divisors)) or 'none'}"
            )
        self.factor = factor
        self.num_output_tokens = (side // factor) ** 2
        self.layers = make_mlp(vision_dim * factor * factor, text_dim, mlp_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(space_to_depth(x, self.factor))
