"""The learning-rate schedule against transformers' own: the Trainer's warmup-step count and the
cosine schedules LLaVA, TinyLLaVA and OneVision train with (transformers installed here)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments
from transformers.optimization import (
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from lmm.train.module import OptimConfig
from lmm.train.schedule import warmup_cosine

TOTALS = [1, 2, 7, 33, 100, 1200, 2181]
RATIOS = [0.0, 0.03, 0.05, 0.07, 0.1, 0.5]


def hf_factors(total: int, ratio: float, min_lr_ratio: float) -> list[float]:
    """The factor of each step from transformers: Trainer's warmup steps for a ratio (5.x
    passes the ratio as a float ``warmup_steps``), then its cosine schedule in a LambdaLR."""
    warmup = TrainingArguments(output_dir="unused", warmup_steps=ratio).get_warmup_steps(total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if min_lr_ratio:
        sched = get_cosine_with_min_lr_schedule_with_warmup(
            opt, warmup, total, min_lr_rate=min_lr_ratio
        )
    else:
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    return [sched.lr_lambdas[0](step) for step in range(total + 1)]


@pytest.mark.parametrize("total", TOTALS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_default_schedule_is_transformers_trainers(total, ratio, min_lr_ratio):
    assert OptimConfig().warmup_style == "hf_trainer"
    factor = warmup_cosine(total, ratio, min_lr_ratio)
    assert [factor(step) for step in range(total + 1)] == hf_factors(total, ratio, min_lr_ratio)


def test_first_update_is_at_zero_and_warmup_rounds_up():
    """TinyLLaVA's base pretrain (2181 steps, 3%): 66 warmup steps (65.43 rounded up), the
    first update at lr 0, the peak at step 66."""
    factor = warmup_cosine(2181, 0.03, 0.0)
    assert factor(0) == 0.0 and factor(65) == 65 / 66 and factor(66) == 1.0
    old = warmup_cosine(2181, 0.03, 0.0, "lmm")
    assert old(0) == 1 / 65 and old(64) == 1.0  # int(65.43) = 65 steps, peak at step 64


@pytest.mark.parametrize("total, ratio", [(1200, 0.05), (1200, 0.03), (800, 0.05), (100, 0.0)])
def test_lmm_style_is_warmup_from_the_first_step(total, ratio):
    """lmm's own style, written out: int() warmup, (step + 1) / warmup, clamped cosine."""
    factor = warmup_cosine(total, ratio, 0.1, "lmm")
    warmup = int(ratio * total)
    for step in range(total + 2):
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert factor(step) == expected


def test_unknown_style_names_the_option():
    with pytest.raises(ValueError, match="model.optim.warmup_style: unknown style 'linear'"):
        warmup_cosine(10, 0.1, 0.0, "linear")
