"""Numerical faults (``lmm.train.nonfinite``): a step with a non-finite loss or gradient is skipped
(weights and optimizer state untouched), counted, and too many in a row stop the run with the
steps and sample ids; gradient clipping works alongside."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback

from lmm.data.datamodule import LMMDataModule
from lmm.errors import NonFiniteError
from lmm.model.freeze import FreezeConfig
from lmm.model.language import LanguageConfig
from lmm.model.towers import VisionConfig
from lmm.train.cli import LMMCLI
from lmm.train.module import LMMModule, OptimConfig
from lmm.train.nonfinite import NonFiniteGuard


class Faults(Callback):
    """Poisons chosen steps: NaN pixels (a NaN loss) or an inf gradient with a finite loss;
    records the weights around every step and the sample ids of each step."""

    def __init__(self, nan_loss: set[int] = frozenset(), inf_grad: set[int] = frozenset()) -> None:
        self.nan_loss, self.inf_grad = nan_loss, inf_grad
        self.changed: dict[int, bool] = {}
        self.ids: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters()]
        self.ids[trainer.global_step] = list(batch["ids"])
        if trainer.global_step in self.nan_loss:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.inf_grad:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        self.changed[step] = any(
            not torch.equal(a, p) for a, p in zip(self._before, pl_module.parameters())
        )


def run(
    tiny_models, world, guard: NonFiniteGuard, faults: Faults, max_steps: int
) -> tuple[L.Trainer, LMMModule]:
    torch.manual_seed(0)
    module = LMMModule(
        vision=VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        llm=LanguageConfig(name_or_path=str(tiny_models["llm"])),
        freeze=FreezeConfig(),
        optim=OptimConfig(warmup_ratio=0.0),  # no warmup step at lr 0: every clean step moves
    )
    dm = LMMDataModule(
        train=[f"{world}/pretrain/shard-*.tar"],
        batch_size=4,
        num_workers=0,
        max_length=64,
        processor=module.processor,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=0.5,
        callbacks=[guard, faults],
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module


def test_nonfinite_steps_are_skipped_and_counted(tiny_models, tiny_world):
    guard, faults = NonFiniteGuard(max_consecutive=3), Faults(nan_loss={2, 3}, inf_grad={5})
    trainer, module = run(tiny_models, tiny_world[0], guard, faults, max_steps=8)
    assert trainer.global_step == 8  # a skipped step still counts (schedule, data position)
    assert guard.skipped == 3 and float(trainer.callback_metrics["train/nonfinite_skipped"]) == 3.0
    assert {s for s, changed in faults.changed.items() if not changed} == {
        2,
        3,
        5,
    }  # weights untouched there
    optimizer = trainer.optimizers[0]
    assert {int(optimizer.state[p]["step"]) for p in module.parameters() if p.requires_grad} == {
        8 - 3
    }
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert guard.state_dict() == {
        "skipped": 3,
        "consecutive": [],
    }  # saved in checkpoints, resumed with them


def test_too_many_nonfinite_steps_in_a_row_stop_with_steps_and_sample_ids(tiny_models, tiny_world):
    guard, faults = NonFiniteGuard(max_consecutive=3), Faults(nan_loss={1, 2, 4, 5, 6})
    with pytest.raises(NonFiniteError) as info:
        run(tiny_models, tiny_world[0], guard, faults, max_steps=10)
    message = str(info.value)
    assert message.startswith(
        "training stopped at step 6: 3 optimizer steps in a row (steps 4-6) had a non-finite "
        "loss or gradient (5 skipped in this run)"
    )
    for step in (4, 5, 6):
        assert f"step {step}: {', '.join(faults.ids[step])}" in message
    assert "nonfinite.max_consecutive" in message and "trainer.gradient_clip_val" in message


def test_the_guard_is_always_on_in_the_cli(tiny_models, tiny_world):
    root = tiny_world[0]
    base = [
        "--model.vision.name_or_path",
        str(tiny_models["vision"]),
        "--model.llm.name_or_path",
        str(tiny_models["llm"]),
        "--data.train",
        f"[{root}/pretrain/shard-*.tar]",
        "--trainer.logger",
        "false",
    ]
    (guard,) = [
        c for c in LMMCLI(args=base, run=False).trainer.callbacks if isinstance(c, NonFiniteGuard)
    ]
    assert guard.max_consecutive == 5
    cli = LMMCLI(args=base + ["--nonfinite.max_consecutive", "2"], run=False)
    assert [c.max_consecutive for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)] == [
        2
    ]
