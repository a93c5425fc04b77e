"""TinyLLaVA's Perceiver resampler (TinyLLaVA_Factory ``tinyllava/model/connector/resampler.py``,
registered there as ``resampler``; here ``tinyllava_resampler``, beside lmm's own
``resampler``).

It differs from lmm's ``resampler`` in the ways that decide what a TinyLLaVA checkpoint holds
and how it trains: the vision tokens are projected to the LM width *first* (``linear``), the
learned latents (128 by default, std-1 init) attend at the LM width with bias-free
projections (8 heads of 64), keys and values are the media tokens followed by the latents,
3 blocks of attention + bias-free 4x GELU feed-forward, each residual, then a final LayerNorm
whose output goes to the LM as is.

Parameter names and shapes are TinyLLaVA_Factory's, so its connector weights load as they are
(its keys carry the extra prefix ``connector._connector.`` where lmm's carry ``connector.``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmm.errors import ConfigError

DEFAULT_QUERIES = 128  # TinyLLaVA_Factory ModelArguments.num_queries
DEFAULT_DEPTH = 3  # ModelArguments.num_resampler_layers


class PerceiverAttention(nn.Module):
    """Latents attend to ``[media tokens, latents]``; pre-norm, no biases, ``heads x head_dim``
    inner width."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # [b, heads, n, head_dim]

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([self.norm_media(media), latents], dim=1)).chunk(2, dim=-1)
        # softmax(q k^T / sqrt(head_dim)) v, the reference's attention (its max-subtraction is
        # the usual stabilisation softmax does anyway).
        out = F.scaled_dot_product_attention(
            self._split(self.to_q(latents)), self._split(k), self._split(v)
        )
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm, bias-free ``dim -> mult*dim -> dim`` GELU MLP (indices as the reference's)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, mult * dim, bias=False),
        nn.GELU(),
        nn.Linear(mult * dim, dim, bias=False),
    )


class TinyLLaVAResampler(nn.Module):
    """``[B, N, vision_dim]`` -> ``[B, num_queries, text_dim]`` (see the module docstring).

    Args:
        vision_dim: Tower width.
        text_dim: LM width: the latents' and attention's width.
        num_tokens: Tokens per image from the tower (any count works).
        num_queries: Learned latents = image tokens the LM sees (None: 128).
        depth: Attention + feed-forward blocks (None: 3).
        heads: Attention heads (TinyLLaVA: 8).
        head_dim: Width per head (TinyLLaVA: 64).
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
        head_dim: int = 64,
    ) -> None:
        super().__init__()
        num_queries = DEFAULT_QUERIES if num_queries is None else num_queries
        depth = DEFAULT_DEPTH if depth is None else depth
        if num_queries < 1 or depth < 1 or heads < 1 or head_dim < 1:
            raise ConfigError(
                "model.connector: tinyllava_resampler needs num_queries, depth, heads and head_dim >= 1, "
                f"got {num_queries}, {depth}, {heads}, {head_dim}"
            )
        self.latents = nn.Parameter(torch.randn(num_queries, text_dim))
        self.linear = nn.Linear(vision_dim, text_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(text_dim, heads, head_dim), feed_forward(text_dim)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(text_dim)
        self.num_output_tokens = num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        media = self.linear(x)
        latents = self.latents.to(media.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
