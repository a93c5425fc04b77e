"""The learning-rate factor of each optimizer step: linear warmup, then cosine decay to
``min_lr_ratio`` (``model.optim.warmup_style``).

- ``hf_trainer``: as transformers' ``Trainer`` with ``lr_scheduler_type cosine`` runs it for
  LLaVA, TinyLLaVA and LLaVA-NeXT: ``ceil(total x warmup_ratio)`` warmup steps
  (``training_args.py::TrainingArguments.get_warmup_steps``), factor ``step / warmup`` (the
  first update at lr 0), then half a cosine over the remaining steps
  (``optimization.py::get_cosine_schedule_with_warmup``; with a floor,
  ``get_cosine_with_min_lr_schedule_with_warmup``'s ``min_lr_rate``).
- ``lmm``: ``int(total x warmup_ratio)`` warmup steps, factor ``(step + 1) / warmup`` (the
  first update already moves; peak at the last warmup step), cosine progress clamped at 1
  (lmm's tiny recipes).

``step`` counts optimizer updates from 0 (``LambdaLR``: update k uses ``factor(k - 1)``).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, get_args

WarmupStyle = Literal["hf_trainer", "lmm"]
WARMUP_STYLES: tuple[str, ...] = get_args(WarmupStyle)


def warmup_cosine(
    total: int, warmup_ratio: float, min_lr_ratio: float, style: str = "hf_trainer"
) -> Callable[[int], float]:
    """The factor of the peak learning rate at each step of a ``total``-step run."""
    if style == "lmm":
        warmup = int(warmup_ratio * total)

        def lmm_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        return lmm_factor
    if style != "hf_trainer":
        raise ValueError(
            f"model.optim.warmup_style: unknown style {style!r}; allowed: {', '.join(WARMUP_STYLES)}"
        )
    warmup = math.ceil(total * warmup_ratio)

    def hf_factor(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, cosine * (1 - min_lr_ratio) + min_lr_ratio)

    return hf_factor
