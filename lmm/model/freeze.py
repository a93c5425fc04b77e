"""Per-component freezing policies and the trainable/frozen parameter table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from torch import nn

from lmm.errors import ConfigError
from lmm.model.lora import LoRAConfig, apply_lora, has_lora

Policy = Literal["full", "frozen", "partial", "lora"]
POLICIES = ("full", "frozen", "partial", "lora")


@dataclass
class FreezeConfig:
    """Which parameters of each component train in this stage.

    Args:
        vision: ``full`` trains the tower, ``frozen`` freezes it, ``partial`` freezes the
            patch embedding and the blocks before ``vision_from_layer``, ``lora`` freezes it
            and trains low-rank adapters (``vision_lora``).
        vision_from_layer: First trainable tower block under ``partial`` (e.g. 12); for a fused
            tower, in each of its towers.
        vision_lora: Adapters of the tower under ``lora``.
        connector: ``full`` or ``frozen``.
        llm: ``full``, ``frozen``, ``partial`` (token embeddings and blocks before
            ``llm_from_layer`` frozen; later blocks, the final norm and the output head
            train, except a head tied to the token embeddings (Gemma, small Qwen2), which is
            the embedding matrix and stays frozen with it) or ``lora`` (frozen, adapters from
            ``llm_lora`` train).
        llm_from_layer: First trainable decoder block under ``partial``.
        llm_lora: Adapters of the language model under ``lora``.
    """

    vision: Policy = "full"
    vision_from_layer: int = 0
    vision_lora: LoRAConfig = field(default_factory=LoRAConfig)
    connector: Literal["full", "frozen"] = "full"
    llm: Policy = "full"
    llm_from_layer: int = 0
    llm_lora: LoRAConfig = field(default_factory=LoRAConfig)

    def describe(self) -> str:
        """One line per stage log, e.g. ``vision partial from 12, connector full, llm lora r8``:
        only the options the chosen policies use."""

        def part(name: str, policy: str, from_layer: int, lora: LoRAConfig) -> str:
            if policy == "partial":
                return f"{name} partial from {from_layer}"
            if policy == "lora":
                return f"{name} lora r{lora.rank} alpha {lora.alpha:g}"
            return f"{name} {policy}"

        return ", ".join(
            [
                part("vision", self.vision, self.vision_from_layer, self.vision_lora),
                f"connector {self.connector}",
                part("llm", self.llm, self.llm_from_layer, self.llm_lora),
            ]
        )

    def __post_init__(self) -> None:
        # Checkpoint hyperparameters come back as plain dicts.
        for name in ("vision_lora", "llm_lora"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, LoRAConfig(**getattr(self, name)))


def apply_policy(
    module: nn.Module,
    policy: str,
    blocks: nn.ModuleList | None,
    from_layer: int,
    option: str,
    lora: Optional[LoRAConfig] = None,
) -> None:
    """Set ``requires_grad`` on ``module``'s parameters according to ``policy``.

    Under ``partial`` the parameters registered before the blocks (embeddings) and the
    blocks before ``from_layer`` are frozen; later blocks and what follows them (final
    norm, output head) train. Registration order is forward order in transformers models.
    A tied output head is the token-embedding tensor, met (once) before the blocks: it stays
    frozen, since training it would move every input embedding that ``partial`` keeps.
    Under ``lora`` the module is frozen and adapters (``lora``, default settings if None)
    are injected into its linear layers and trained.
    """
    if policy not in POLICIES:
        raise ConfigError(f"{option}: unknown policy {policy!r}; allowed: {', '.join(POLICIES)}")
    if policy == "lora":
        apply_lora(module, blocks, lora or LoRAConfig(), option)
        return
    if has_lora(module):
        # Training base weights under live adapters would mix two parametrisations.
        raise ConfigError(
            f"{option}: the component carries LoRA adapters; merge them (lmm.model.lora.merge_lora) "
            f"before applying {policy!r}"
        )
    for p in module.parameters():
        p.requires_grad_(policy == "full")
    if policy != "partial":
        return
    if blocks is None:
        raise ConfigError(f"{option}: 'partial' needs a component with blocks")
    if not 0 <= from_layer <= len(blocks):
        raise ConfigError(
            f"{option}_from_layer={from_layer} is outside [0, {len(blocks)}] for this component"
        )
    block_params = {id(p) for p in blocks.parameters()}
    trainable = {id(p) for b in list(blocks)[from_layer:] for p in b.parameters()}
    seen_blocks = False
    for p in module.parameters():
        if id(p) in block_params:
            seen_blocks = True
            p.requires_grad_(id(p) in trainable)
        else:
            p.requires_grad_(seen_blocks)  # after the blocks: train; before: freeze


def parameter_table(components: dict[str, nn.Module]) -> tuple[str, dict[str, dict[str, int]]]:
    """A printable table of trainable / frozen parameter counts per component, and the counts."""
    counts: dict[str, dict[str, int]] = {}
    for name, module in components.items():
        seen: set[int] = set()
        trainable = frozen = 0
        for p in module.parameters():
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
        counts[name] = {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}
    counts["total"] = {
        k: sum(c[k] for c in counts.values()) for k in ("trainable", "frozen", "total")
    }
    lines = [f"{'component':<10} {'trainable':>12} {'frozen':>12} {'total':>12}"]
    lines += [
        f"{n:<10} {c['trainable']:>12,} {c['frozen']:>12,} {c['total']:>12,}"
        for n, c in counts.items()
    ]
    return "\n".join(lines), counts
