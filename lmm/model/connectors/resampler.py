"""Perceiver resampler: a fixed number of learned queries read the tower's tokens by
cross-attention, so the LM sees ``num_queries`` image tokens whatever the tower's grid
(Flamingo / Qwen-VL style, at the tower's width; TinyLLaVA's own variant, at the LM width, is
``tinyllava_resampler``)."""

from __future__ import annotations

import torch
from torch import nn

from lmm.errors import ConfigError


class ResamplerBlock(nn.Module):
    """Pre-norm cross-attention (queries -> vision tokens and the queries themselves), then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qn = self.norm_q(q)
        # As in Flamingo, keys/values include the queries, so queries also exchange information.
        kv = torch.cat([self.norm_x(x), qn], dim=1)
        q = q + self.attn(qn, kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class Resampler(nn.Module):
    """``num_queries`` learned queries (None: 64), ``depth`` cross-attention blocks (None: 2) at
    the tower's width with ``heads`` heads, a final norm and a linear projection to the LM width.

    The vision tokens carry the tower's position embeddings already, so no positions are
    added here; the output does not depend on the order of the input tokens.
    """

    learned_queries = True  # no 2-D token grid: AnyRes / video cannot stitch or pool its output

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        num_tokens: int,
        num_queries: int | None = None,
        depth: int | None = None,
        heads: int = 8,
    ) -> None:
        super().__init__()
        num_queries = 64 if num_queries is None else num_queries
        depth = 2 if depth is None else depth
        if num_queries < 1 or depth < 1:
            raise ConfigError(
                f"model.connector: resampler needs num_queries >= 1 and depth >= 1, got {num_queries}, {depth}"
            )
        if heads < 1 or vision_dim % heads:
            raise ConfigError(
                f"model.connector.heads={heads} must divide the tower width {vision_dim}"
            )
        self.queries = nn.Parameter(torch.randn(num_queries, vision_dim) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(vision_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, text_dim)
        self.num_output_tokens = num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.queries.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, x)
        return self.proj(self.norm(q))
