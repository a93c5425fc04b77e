"""Q-Former connector (BLIP-2): learned query tokens read the tower's tokens through the
cross-attention layers of transformers' ``Blip2QFormerModel``, then a linear projection maps
them to the LM width. The LM sees ``num_queries`` tokens per image whatever the tower's grid.

Built as ``Blip2ForConditionalGeneration`` builds it (``query_tokens`` parameter,
``Blip2QFormerModel``, ``language_projection``), sized by the options: a cross-attention in
layers ``0, f, 2f, ...`` (``cross_attention_frequency`` f, BLIP-2's 2), FFN width 4x the
hidden size. TinyLLaVA's ``qformer`` connector (``tinyllava/model/connector/qformer.py``) is
the same architecture from a BERT-base config (12 layers, width 768, 12 heads, cross-attention
every 2nd layer, random init); its queries start from N(0, 0.02) as here. Dropout is 0 (BLIP-2
and BERT use 0.1), as in lmm's other connectors.
"""

from __future__ import annotations

import torch
from torch import nn

from lmm.errors import ConfigError


class QFormer(nn.Module):
    """``num_queries`` learned queries, a ``num_layers``-layer Q-Former of width ``hidden_size``
    with ``heads`` heads, and ``Linear(hidden_size, text_dim)``."""

    learned_queries = True  # no 2-D token grid: AnyRes / video cannot stitch or pool its output

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        num_tokens: int,
        num_queries: int | None = None,
        num_layers: int = 12,
        cross_attention_frequency: int = 2,
        hidden_size: int = 768,
        heads: int = 8,
    ) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        num_queries = 64 if num_queries is None else num_queries

        for name, value in (
            ("num_queries", num_queries),
            ("num_layers", num_layers),
            ("cross_attention_frequency", cross_attention_frequency),
            ("hidden_size", hidden_size),
        ):
            if value < 1:
                raise ConfigError(f"model.connector.{name} must be >= 1 for qformer, got {value}")
        if heads < 1 or hidden_size % heads:
            raise ConfigError(
                f"model.connector.heads={heads} must divide model.connector.hidden_size={hidden_size}"
            )
        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden_size,
            encoder_hidden_size=vision_dim,
            cross_attention_frequency=cross_attention_frequency,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.qformer = Blip2QFormerModel(config)
        self.query_tokens = nn.Parameter(
            torch.randn(1, num_queries, hidden_size) * config.initializer_range
        )
        self.proj = nn.Linear(hidden_size, text_dim)
        self.num_output_tokens = num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(x.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=x).last_hidden_state
        return self.proj(out)
