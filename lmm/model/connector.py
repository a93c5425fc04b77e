"""Connectors project vision features ``[B, N, Dv]`` into the LM's embedding space ``[B, N', Dl]``.

A connector factory takes ``(vision_dim, text_dim, num_tokens)``; every connector exposes
``num_output_tokens`` so the data side can expand ``<image>`` to the right count before the
model runs.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmm.registry import ConfigError, Registry

ConnectorFactory = Callable[[int, int, int], nn.Module]
CONNECTORS: Registry[ConnectorFactory] = Registry("connector")


class Identity(nn.Module):
    """Passes features through; the tower width must equal the LM width."""

    def __init__(self, vision_dim: int, text_dim: int, num_tokens: int) -> None:
        super().__init__()
        if vision_dim != text_dim:
            raise ConfigError(f"model.connector: 'identity' needs equal widths, got vision {vision_dim} vs LM {text_dim}")
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _mlp(vision_dim: int, text_dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(vision_dim, text_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """``depth`` linear layers with GELU between them (depth 1 = LLaVA-1's linear projector)."""

    def __init__(self, vision_dim: int, text_dim: int, num_tokens: int, depth: int = 2) -> None:
        super().__init__()
        self.layers = _mlp(vision_dim, text_dim, depth)
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PoolMLP(nn.Module):
    """Average-pool the square patch grid ``pool`` x ``pool``, then an MLP: ``pool**2`` times
    fewer visual tokens for the LM (the token reduction LLaVA-OneVision applies to video)."""

    def __init__(self, vision_dim: int, text_dim: int, num_tokens: int, pool: int = 2, depth: int = 2) -> None:
        super().__init__()
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side % pool:
            raise ConfigError(
                f"model.connector: {pool}x{pool} pooling needs a square grid whose side divides by {pool}; "
                f"the tower gives {num_tokens} tokens"
            )
        self.side, self.pool = side, pool
        self.num_output_tokens = (side // pool) ** 2
        self.layers = _mlp(vision_dim, text_dim, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        return self.layers(pooled)


CONNECTORS.add("identity", Identity)
CONNECTORS.add("linear", partial(MLP, depth=1))
for _depth in (2, 3, 4):
    CONNECTORS.add(f"mlp{_depth}x_gelu", partial(MLP, depth=_depth))
CONNECTORS.add("pool2x2_mlp2x_gelu", partial(PoolMLP, pool=2, depth=2))


def build_connector(name: str, vision_dim: int, text_dim: int, num_tokens: int) -> nn.Module:
    return CONNECTORS.get(name, option="model.connector")(vision_dim, text_dim, num_tokens)
