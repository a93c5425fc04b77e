"""Token-preserving connectors (identity, linear, GELU MLPs, Prismatic's fused MLP) and 2x2
average pooling + MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmm.errors import ConfigError


def make_mlp(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """``depth`` linear layers with GELU between them; the first maps ``in_dim`` -> ``out_dim``."""
    if depth < 1:
        raise ConfigError(f"model.connector: an MLP needs at least one layer, got depth {depth}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def square_side(num_tokens: int, what: str) -> int:
    """Side of the square patch grid holding ``num_tokens`` tokens (row-major), or a ConfigError."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ConfigError(
            f"model.connector: {what} needs a square grid of patch tokens; the tower gives {num_tokens} tokens "
            "(a CLS token kept by model.vision.select=full breaks the grid)"
        )
    return side


class Identity(nn.Module):
    """Passes features through; the tower width must equal the LM width."""

    def __init__(self, vision_dim: int, text_dim: int, num_tokens: int) -> None:
        super().__init__()
        if vision_dim != text_dim:
            raise ConfigError(
                f"model.connector: 'identity' needs equal widths, got vision {vision_dim} vs LM {text_dim}"
            )
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MLP(nn.Module):
    """``depth`` linear layers with GELU between them (depth 1 = LLaVA-1's linear projector)."""

    def __init__(self, vision_dim: int, text_dim: int, num_tokens: int, depth: int = 2) -> None:
        super().__init__()
        self.layers = make_mlp(vision_dim, text_dim, depth)
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FusedMLP(nn.Module):
    """Prismatic's ``fused-gelu-mlp`` projector for fused towers (``prismatic/util/nn_utils.py``,
    ``FusedMLPProjector``): ``Linear(D, 4D) -> GELU -> Linear(4D, Dl) -> GELU -> Linear(Dl, Dl)``,
    a 4x-wide first layer over the concatenated features."""

    def __init__(self, vision_dim: int, text_dim: int, num_tokens: int) -> None:
        super().__init__()
        wide = 4 * vision_dim
        self.layers = nn.Sequential(
            nn.Linear(vision_dim, wide),
            nn.GELU(),
            nn.Linear(wide, text_dim),
            nn.GELU(),
            nn.Linear(text_dim, text_dim),
        )
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PoolMLP(nn.Module):
    """Average-pool the square patch grid ``pool`` x ``pool``, then an MLP: ``pool**2`` times
    fewer visual tokens for the LM (the token reduction LLaVA-OneVision applies to video)."""

    def __init__(
        self, vision_dim: int, text_dim: int, num_tokens: int, pool: int = 2, depth: int = 2
    ) -> None:
        super().__init__()
        side = square_side(num_tokens, f"{pool}x{pool} pooling")
        if side % pool:
            raise ConfigError(
                f"model.connector: {pool}x{pool} pooling needs a square grid whose side divides by {pool}; "
                f"the tower gives {num_tokens} tokens"
            )
        self.side, self.pool = side, pool
        self.num_output_tokens = (side // pool) ** 2
        self.layers = make_mlp(vision_dim, text_dim, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        return self.layers(pooled)
