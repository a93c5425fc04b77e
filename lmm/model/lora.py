"""LoRA adapters (via peft) for the ``lora`` freeze policy: inject, merge, and the key
mapping the weight files use.

Adapters are injected *in place* (``peft.inject_adapter_in_model``): only the adapted
``nn.Linear`` leaves change, so the component keeps its transformers class and methods
(``generate``, ``get_decoder``, ...) and every other parameter keeps its name. A
``PeftModel`` wrapper would rename every key (``base_model.model.``) and hide those methods.

Weight files never hold peft's internal names. A layer ``x`` adapted by peft has
``x.base_layer.weight`` and ``x.lora_A.default.weight``; files call them ``x.weight`` and
``x.lora_A.weight`` (see :func:`file_key`), so a file loads whether or not the model it is
loaded into carries adapters (``lmm.checkpoints.weights``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmm.errors import ConfigError

ADAPTER = "default"  # peft's adapter name; lmm uses one adapter per layer
_ADAPTER_KINDS = ("lora_A", "lora_B")


@dataclass
class LoRAConfig:
    """Low-rank adapters for one component under the ``lora`` freeze policy: the
    component's own weights are frozen and each adapted linear layer ``W`` becomes
    ``W + (alpha / rank) * B @ A`` with trainable ``A`` (rank x in) and ``B`` (out x rank, zero at start).

    Args:
        rank: Rank of each adapter pair.
        alpha: Scale numerator: the adapter's update is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter's input during training.
        target_modules: Linear layers to adapt, by module name or name suffix after a dot
            (e.g. ``[q_proj, v_proj]``). Empty: every linear layer inside the transformer
            blocks (attention and MLP), which leaves embeddings and the LM head alone.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """``{module name: peft LoRA layer}`` for every adapted layer inside ``module``."""
    if "peft" not in sys.modules:
        return {}  # adapters need peft imported; importing it just to find none costs seconds
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def _linear_names(module: nn.Module, within: nn.Module | None = None) -> list[str]:
    """Names (relative to ``module``) of its ``nn.Linear`` layers, optionally only those inside ``within``."""
    inside = None if within is None else {id(m) for m in within.modules()}
    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and (inside is None or id(m) in inside)
    ]


def _targets(
    module: nn.Module, blocks: nn.ModuleList | None, cfg: LoRAConfig, option: str
) -> list[str]:
    if not cfg.target_modules:
        if blocks is None:
            raise ConfigError(
                f"{option}: 'lora' without {option}_lora.target_modules needs a component with blocks"
            )
        names = _linear_names(module, blocks)
        if not names:
            raise ConfigError(f"{option}: no linear layers inside the blocks to adapt")
        return names
    names = _linear_names(module)
    chosen: list[str] = []
    for target in cfg.target_modules:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            known = sorted({n.rpartition(".")[2] for n in names})
            raise ConfigError(
                f"{option}_lora.target_modules: {target!r} names no linear layer of this component; "
                f"linear layer names: {', '.join(known)}"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def apply_lora(
    module: nn.Module, blocks: nn.ModuleList | None, cfg: LoRAConfig, option: str
) -> None:
    """Freeze ``module`` and give its target linear layers trainable LoRA adapters.

    Applying the same config again only resets ``requires_grad``; a component that already
    carries adapters of another config is an error (merge them first: :func:`merge_lora`).
    """
    if cfg.rank < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1:
        raise ConfigError(
            f"{option}_lora: need rank >= 1, alpha > 0, 0 <= dropout < 1; got {asdict(cfg)}"
        )
    existing = getattr(module, "lmm_lora", None)
    if existing is None:
        from peft import LoraConfig, inject_adapter_in_model

        peft_cfg = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=_targets(module, blocks, cfg, option),
            bias="none",
        )
        inject_adapter_in_model(peft_cfg, module, adapter_name=ADAPTER)
        module.lmm_lora = asdict(
            cfg
        )  # plain attribute: what was injected, for re-application checks
    elif existing != asdict(cfg):
        raise ConfigError(
            f"{option}: the component already has LoRA adapters {existing}; merge them before applying {asdict(cfg)}"
        )
    for name, p in module.named_parameters():
        p.requires_grad_(any(f".{k}." in name for k in _ADAPTER_KINDS))


def has_lora(module: nn.Module) -> bool:
    return bool(lora_layers(module))


@torch.no_grad()
def merged_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight with the adapter's update added (what ``merge()`` would write)."""
    base = layer.get_base_layer().weight
    if ADAPTER in getattr(layer, "merged_adapters", []):
        return base.detach().clone()
    return (base + layer.get_delta_weight(ADAPTER).to(base.dtype)).detach()


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Merge every adapter into its base weight and put the plain layer back in place (what
    peft's ``merge_and_unload`` does, for in-place adapters). Returns the number of layers."""
    layers = lora_layers(module)
    for name, layer in layers.items():
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, attr = name.rpartition(".")
        setattr(
            module.get_submodule(parent_name) if parent_name else module,
            attr,
            layer.get_base_layer(),
        )
    for m in module.modules():
        if hasattr(m, "lmm_lora"):
            del m.lmm_lora
    return len(layers)


# -- weight-file keys ------------------------------------------------------------------------------


def split_key(key: str, layers: dict[str, nn.Module]) -> tuple[str | None, str | None]:
    """``(layer name, part)`` for a state-dict key inside an adapted layer, part being ``base``,
    ``lora_A`` or ``lora_B``; ``(None, None)`` for any other key."""
    for marker, part in ((".base_layer.", "base"), (".lora_A.", "lora_A"), (".lora_B.", "lora_B")):
        prefix, found, _ = key.partition(marker)
        if found and prefix in layers:
            return prefix, part
    return None, None


def file_key(key: str, layers: dict[str, nn.Module]) -> str:
    """The name a state-dict key has in lmm weight files (peft's internal names removed)."""
    prefix, part = split_key(key, layers)
    if part is None:
        return key
    if part == "base":
        return key.replace(".base_layer.", ".", 1)
    return f"{prefix}.{part}.{key.rpartition('.')[2]}"  # x.lora_A.default.weight -> x.lora_A.weight


def adapter_file_key(key: str) -> tuple[str, str] | None:
    """``(layer name, lora_A|lora_B)`` for a weight-file adapter key, else None."""
    for kind in _ADAPTER_KINDS:
        suffix = f".{kind}.weight"
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def scalings(layers: dict[str, nn.Module]) -> dict[str, float]:
    """``{layer name: alpha / rank}`` (stored with adapter files so they can be merged on load)."""
    return {name: float(layer.scaling[ADAPTER]) for name, layer in layers.items()}
