"""Mixture-of-features connector (TinyLLaVA's ``mof_mlp``, ``tinyllava/model/connector/mof_mlp.py``,
``MoFMLP``): a fused tower joined by ``interleave`` gives tower k's token i at position
``i * K + k``; each tower's tokens go through that tower's own GELU MLP, and the LM sees them
still interleaved (``K x N`` tokens). TinyLLaVA's two MLPs are ``Linear(D, Dl) -> GELU ->
Linear(Dl, Dl)``: ``mlp_depth: 2``."""

from __future__ import annotations

import torch
from torch import nn

from lmm.errors import ConfigError
from lmm.model.connectors.mlp import make_mlp


class MoFMLP(nn.Module):
    """One MLP of ``mlp_depth`` layers per tower of an interleaving fused tower."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        num_tokens: int,
        mlp_depth: int = 2,
        token_groups: int = 1,
    ) -> None:
        super().__init__()
        if token_groups < 2:
            raise ConfigError(
                "model.connector: mof_mlp gives each tower of a fused tower its own MLP; it needs "
                "model.vision.kind: fused with model.vision.fused.join: interleave"
            )
        self.mlps = nn.ModuleList(
            make_mlp(vision_dim, text_dim, mlp_depth) for _ in range(token_groups)
        )
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        groups = len(self.mlps)
        per_tower = x.reshape(b, n // groups, groups, -1)  # [B, N, K, D]: token i*K + k -> (i, k)
        out = torch.stack([mlp(per_tower[:, :, k]) for k, mlp in enumerate(self.mlps)], dim=2)
        return out.reshape(b, n, -1)
