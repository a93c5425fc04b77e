"""Sharded training: FSDP (Lightning ``FSDPStrategy``) and FSDP2 (Lightning
``ModelParallelStrategy``, applied in ``LMMModule.configure_model``).

Both shard by block: every vision-tower block and LM decoder layer is its own unit (marked
by ``lmm.model.efficiency.mark_blocks``), whatever the family, so one config serves SigLIP,
CLIP, timm or open_clip towers with any LM.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lmm.model.efficiency import is_block


def block_policy() -> Any:
    """An FSDP auto-wrap (and activation-checkpointing) policy: wrap exactly the marked blocks."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=is_block)


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with lmm's defaults: each vision block and decoder layer
    is an FSDP unit, optionally activation-checkpointed, and ``use_orig_params`` so frozen and
    trainable parameters may share a unit (partial freezing, LoRA).

    Args:
        activation_checkpointing: Recompute every block in backward.
        kwargs: Any other ``FSDPStrategy`` argument (``sharding_strategy``,
            ``state_dict_type: full|sharded``, ``cpu_offload``, ...).
    """

    def __init__(self, activation_checkpointing: bool = False, **kwargs: Any) -> None:
        # A parsed config passes every FSDPStrategy argument, unset ones as None.
        if kwargs.get("auto_wrap_policy") is None:
            kwargs["auto_wrap_policy"] = block_policy()
        if activation_checkpointing and kwargs.get("activation_checkpointing_policy") is None:
            kwargs["activation_checkpointing_policy"] = block_policy()
        kwargs.setdefault("use_orig_params", True)
        super().__init__(**kwargs)


def shard_fsdp2(model: nn.Module, mesh: Any) -> int:
    """``fully_shard`` every marked block, then the rest of ``model`` as the root unit.
    Returns the number of block units."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if is_block(m)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def global_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of a tensor or of a sharded DTensor as a whole (a collective for DTensors)."""
    n = torch.linalg.vector_norm(t.float())
    return n.full_tensor() if hasattr(n, "full_tensor") else n
