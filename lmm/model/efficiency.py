"""Speed and memory settings of training: activation checkpointing per component and
``torch.compile``. None of them changes what is computed beyond float rounding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmm.model.loss import DEFAULT_CHUNK_SIZE

# Set on every transformer block (tower blocks, LM decoder layers): the unit of activation
# checkpointing, compilation and FSDP sharding (``lmm.train.parallel``).
BLOCK_MARK = "_lmm_block"


@dataclass
class EfficiencyConfig:
    """How a step is computed (not what): memory/speed trade-offs per component.

    Args:
        grad_checkpointing_vision: Recompute each vision block in backward instead of keeping
            its activations (less memory, about a third more compute in the tower). Only
            matters when the tower trains.
        grad_checkpointing_llm: The same for the LM's decoder layers.
        compile: ``torch.compile`` each block of the tower and the LM (regional compilation:
            short compile times, and the weights keep their names). The first steps are slow.
        compile_backend: ``torch.compile`` backend (``inductor`` for speed; ``aot_eager`` or
            ``eager`` to debug).
        compile_dynamic: Compile for varying sequence lengths up front (``None``: PyTorch
            decides after the first recompilation).
        loss_chunk_size: Supervised positions per LM-head chunk: at most ``chunk x vocab``
            logits exist at once (``lmm.model.loss``).
    """

    grad_checkpointing_vision: bool = False
    grad_checkpointing_llm: bool = False
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    compile_dynamic: Optional[bool] = None
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if self.loss_chunk_size < 1:
            raise ValueError(
                f"model.efficiency.loss_chunk_size must be >= 1, got {self.loss_chunk_size}"
            )


def mark_blocks(blocks: Iterable[nn.Module]) -> None:
    for block in blocks:
        setattr(block, BLOCK_MARK, True)


def is_block(module: nn.Module) -> bool:
    return bool(getattr(module, BLOCK_MARK, False))


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Wrap each block's forward in non-reentrant activation checkpointing (only while
    autograd records: generation and frozen towers run as before). Returns #blocks wrapped."""
    n = 0
    for block in blocks:
        if getattr(block, "_lmm_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._lmm_checkpointed = True
        n += 1
    return n


def compile_blocks(blocks: Iterable[nn.Module], backend: str, dynamic: Optional[bool]) -> int:
    """``nn.Module.compile`` each block in place (parameter names unchanged)."""
    n = 0
    for block in blocks:
        block.compile(backend=backend, dynamic=dynamic)
        n += 1
    return n
