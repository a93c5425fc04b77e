"""Numerical faults: an optimizer step whose loss or gradients are not finite is skipped and
counted; too many in a row stop the run."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from lmm.errors import NonFiniteError

log = logging.getLogger("lmm")


class NonFiniteGuard(Callback):
    """Skips optimizer steps with a non-finite (NaN/inf) loss or gradient.

    A skipped step leaves the weights and the optimizer state untouched (no moment update, no
    weight decay) but still counts as a step: the global step, the LR schedule and the data
    position advance as in any step, so ``max_steps`` and exact resume are unaffected. Skips are
    counted in TensorBoard (``train/nonfinite_skipped``) and logged with the step and sample ids.
    The check runs before gradient clipping (``trainer.gradient_clip_val``), which then clips
    finite gradients only. Under fp16 mixed precision the grad scaler already skips steps with
    overflowing gradients (and lowers its scale), so only a non-finite loss counts there.

    Args:
        max_consecutive: Stop the run (naming the steps and their sample ids) when this many
            optimizer steps in a row were skipped; 0 never stops.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 0:
            raise ValueError(f"nonfinite.max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive: list[dict[str, Any]] = []  # {"step", "ids"} of the current run of skips
        self._ids: list[str] = []  # samples of the step being accumulated
        self._loss_finite: Optional[torch.Tensor] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict):
            self._ids.extend(str(i) for i in batch.get("ids", []))

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # a tensor: no device sync per micro-batch
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        finite = bool(self._loss_finite) if self._loss_finite is not None else True
        if finite and params and getattr(trainer.precision_plugin, "scaler", None) is None:
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])))
        # Any rank's fault skips the step on every rank, so the replicas stay equal.
        bad = trainer.strategy.reduce_boolean_decision(not finite, all=False)
        ids, self._ids, self._loss_finite = self._ids, [], None
        if bad:
            for p in params:
                p.grad = None  # the optimizer leaves parameters without a gradient alone
            self.skipped += 1
            self.consecutive.append({"step": trainer.global_step, "ids": ids})
            log.warning(
                "step %d: non-finite loss or gradient, optimizer step skipped (samples %s)",
                trainer.global_step,
                ", ".join(ids) or "-",
            )
        else:
            self.consecutive = []
        pl_module.log("train/nonfinite_skipped", float(self.skipped))
        if self.max_consecutive and len(self.consecutive) >= self.max_consecutive:
            raise NonFiniteError(self._report())

    def _report(self) -> str:
        steps = [c["step"] for c in self.consecutive]
        lines = [
            f"training stopped at step {steps[-1]}: {len(steps)} optimizer steps in a row (steps "
            f"{steps[0]}-{steps[-1]}) had a non-finite loss or gradient ({self.skipped} skipped in this run). "
            "Samples of those steps:"
        ]
        lines += [
            f"  step {c['step']}: {', '.join(c['ids']) or '(no sample ids)'}"
            for c in self.consecutive
        ]
        lines.append(
            "Lower the learning rate, set trainer.gradient_clip_val, check these samples, or raise "
            "nonfinite.max_consecutive; resume from the last good checkpoint with --ckpt_path."
        )
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": [dict(c) for c in self.consecutive]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = [dict(c) for c in state_dict.get("consecutive", [])]
