"""Connectors project vision features ``[B, N, Dv]`` into the LM's embedding space ``[B, N', Dl]``.

A connector is a class in ``lmm/model/connectors/`` plus one entry in ``CONNECTORS`` below.
Its factory is called as ``factory(vision_dim, text_dim, num_tokens, **options)``, where
``options`` are the :class:`ConnectorConfig` fields the entry declares (and ``token_groups``,
the tower's, for an entry with per-tower weights). Every connector
exposes ``num_output_tokens`` so the data side can expand ``<image>`` to the right count
before the model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, Optional, Union

from torch import nn

from lmm.errors import ConfigError
from lmm.model.connectors.mlp import MLP, FusedMLP, Identity, PoolMLP
from lmm.model.connectors.mof_mlp import MoFMLP
from lmm.model.connectors.pixel_shuffle import PixelShuffleMLP
from lmm.model.connectors.qformer import QFormer
from lmm.model.connectors.resampler import Resampler
from lmm.model.connectors.tinyllava_resampler import TinyLLaVAResampler
from lmm.registry import Registry


@dataclass
class ConnectorConfig:
    """A connector and its options. A bare name (``connector: mlp2x_gelu``) means "these defaults".

    Args:
        name: Registry name: ``identity``, ``linear``, ``mlp{2,3,4}x_gelu``, ``pool2x2_mlp2x_gelu``,
            ``resampler``, ``tinyllava_resampler``, ``pixel_shuffle``, ``fused_gelu_mlp``
            (Prismatic's projector for fused towers), ``mof_mlp`` (an MLP per tower of an
            interleaving fused tower) or ``qformer`` (BLIP-2's Q-Former).
        num_queries: ``resampler``, ``tinyllava_resampler``, ``qformer``: learned queries, i.e.
            image tokens the LM sees (None: the connector's default, 64 / 128 / 64).
        depth: ``resampler`` / ``tinyllava_resampler``: attention blocks (None: 2 / 3).
        heads: ``resampler``: attention heads (must divide the vision tower's width);
            ``tinyllava_resampler``: attention heads (TinyLLaVA: 8); ``qformer``: attention
            heads (must divide ``hidden_size``; BLIP-2: 12).
        head_dim: ``tinyllava_resampler``: width of each head (TinyLLaVA: 64).
        factor: ``pixel_shuffle``: r; each r x r block of patch tokens becomes one token
            (r*r times fewer tokens; r must divide the side of the token grid).
        mlp_depth: ``pixel_shuffle``: linear layers of the GELU MLP after the shuffle;
            ``mof_mlp``: linear layers of each tower's MLP.
        num_layers: ``qformer``: Q-Former layers.
        cross_attention_frequency: ``qformer``: a cross-attention to the image tokens in
            layers 0, f, 2f, ... (BLIP-2: 2, every other layer).
        hidden_size: ``qformer``: width of the Q-Former and its queries (BLIP-2: 768).
        output_init_std: Any connector with a linear output layer: re-initialise that layer
            from N(0, std^2) with a zero bias (None: PyTorch's default). A from-scratch LM's
            token embeddings have std 0.02; a default-initialised connector writes image
            embeddings about 20x larger, which the LM's layers then can barely change.
    """

    name: str = "mlp2x_gelu"
    num_queries: Optional[int] = None
    depth: Optional[int] = None
    heads: int = 8
    head_dim: int = 64
    factor: int = 2
    mlp_depth: int = 2
    num_layers: int = 12
    cross_attention_frequency: int = 2
    hidden_size: int = 768
    output_init_std: Optional[float] = None


ConnectorSpec = Union[str, ConnectorConfig]
# Options each entry declares; output_init_std applies to every connector (see build_connector).
OPTION_NAMES = tuple(
    f.name for f in fields(ConnectorConfig) if f.name not in ("name", "output_init_std")
)
_DEFAULTS = ConnectorConfig()


@dataclass(frozen=True)
class ConnectorEntry:
    """A registry entry: the factory and the :class:`ConnectorConfig` options it reads.

    ``per_tower``: the factory also takes ``token_groups``, the tower's count of interleaved
    towers (``VisionTower.token_groups``), and gives each its own weights. ``linear_output``:
    the module ends in a linear layer to the LM width (what ``output_init_std`` re-initialises)."""

    factory: Callable[..., nn.Module]
    options: tuple[str, ...] = ()
    per_tower: bool = False
    linear_output: bool = True


CONNECTORS: Registry[ConnectorEntry] = Registry("connector")
CONNECTORS.add("identity", ConnectorEntry(Identity))
CONNECTORS.add("linear", ConnectorEntry(partial(MLP, depth=1)))
for _depth in (2, 3, 4):
    CONNECTORS.add(f"mlp{_depth}x_gelu", ConnectorEntry(partial(MLP, depth=_depth)))
CONNECTORS.add("pool2x2_mlp2x_gelu", ConnectorEntry(partial(PoolMLP, pool=2, depth=2)))
CONNECTORS.add("resampler", ConnectorEntry(Resampler, ("num_queries", "depth", "heads")))
# TinyLLaVA_Factory's resampler: it ends in a LayerNorm, so output_init_std has nothing to set.
CONNECTORS.add(
    "tinyllava_resampler",
    ConnectorEntry(
        TinyLLaVAResampler, ("num_queries", "depth", "heads", "head_dim"), linear_output=False
    ),
)
CONNECTORS.add("pixel_shuffle", ConnectorEntry(PixelShuffleMLP, ("factor", "mlp_depth")))
CONNECTORS.add("fused_gelu_mlp", ConnectorEntry(FusedMLP))
CONNECTORS.add("mof_mlp", ConnectorEntry(MoFMLP, ("mlp_depth",), per_tower=True))
CONNECTORS.add(
    "qformer",
    ConnectorEntry(
        QFormer,
        ("num_queries", "num_layers", "cross_attention_frequency", "hidden_size", "heads"),
    ),
)


def as_connector_config(spec: ConnectorSpec | dict) -> ConnectorConfig:
    """A bare name, a dict (checkpoint hyperparameters) or a config -> :class:`ConnectorConfig`."""
    if isinstance(spec, ConnectorConfig):
        return spec
    if isinstance(spec, str):
        return ConnectorConfig(name=spec)
    if isinstance(spec, dict):
        return ConnectorConfig(**spec)
    raise ConfigError(f"model.connector: expected a name or {{name: ..., options}}, got {spec!r}")


def build_connector(
    spec: ConnectorSpec | dict,
    vision_dim: int,
    text_dim: int,
    num_tokens: int,
    token_groups: int = 1,
) -> nn.Module:
    """Build the connector named by ``spec`` for a tower of width ``vision_dim`` giving
    ``num_tokens`` tokens (of ``token_groups`` interleaved towers) and an LM of width ``text_dim``.

    An option set away from its default on a connector that does not read it is an error:
    it would otherwise be silently ignored.
    """
    cfg = as_connector_config(spec)
    option = "model.connector" if isinstance(spec, str) else "model.connector.name"
    entry = CONNECTORS.get(cfg.name, option=option)
    ignored = [
        k
        for k in OPTION_NAMES
        if k not in entry.options and getattr(cfg, k) != getattr(_DEFAULTS, k)
    ]
    if ignored:
        reads = ", ".join(entry.options) or "no options"
        raise ConfigError(
            f"model.connector.{ignored[0]} does not apply to connector {cfg.name!r} (it reads: {reads})"
        )
    kwargs = {k: getattr(cfg, k) for k in entry.options}
    if entry.per_tower:
        kwargs["token_groups"] = token_groups
    module = entry.factory(vision_dim, text_dim, num_tokens, **kwargs)
    if cfg.output_init_std is not None:
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if not entry.linear_output or not linears or linears[-1].out_features != text_dim:
            raise ConfigError(
                f"model.connector.output_init_std: connector {cfg.name!r} has no linear output layer"
            )
        nn.init.normal_(linears[-1].weight, std=cfg.output_init_std)
        if linears[-1].bias is not None:
            nn.init.zeros_(linears[-1].bias)
    return module
