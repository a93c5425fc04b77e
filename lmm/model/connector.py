"""Connectors project vision features ``[B, N, Dv]`` into the LM's embedding space ``[B, N', Dl]``."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from lmm.registry import Registry

ConnectorFactory = Callable[[int, int], nn.Module]
CONNECTORS: Registry[ConnectorFactory] = Registry("connector")


class Identity(nn.Module):
    """Passes features through; the tower width must equal the LM width."""

    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        if vision_dim != text_dim:
            raise ValueError(f"connector 'identity' needs equal widths, got vision {vision_dim} vs LM {text_dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MLP(nn.Module):
    """``depth`` linear layers with GELU between them (depth 1 = LLaVA-1's linear projector)."""

    def __init__(self, vision_dim: int, text_dim: int, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(vision_dim, text_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


CONNECTORS.add("identity", Identity)
CONNECTORS.add("linear", partial(MLP, depth=1))
for _depth in (2, 3, 4):
    CONNECTORS.add(f"mlp{_depth}x_gelu", partial(MLP, depth=_depth))


def build_connector(name: str, vision_dim: int, text_dim: int) -> nn.Module:
    return CONNECTORS.get(name, option="model.connector")(vision_dim, text_dim)
