"""A Lightning callback for kill tests (tests/test_fault_tolerance.py): a training subprocess
reports its progress through a file, and steps can be slowed so a signal lands mid-run."""

from __future__ import annotations

import os
import time

from lightning.pytorch import Callback


class StepMarker(Callback):
    """Writes ``trainer.global_step`` to ``path`` (atomically; rank 0 only) after every training
    batch, then sleeps ``delay_s``: the steps stay as they are, only the wall time between them
    grows."""

    def __init__(self, path: str, delay_s: float = 0.0) -> None:
        self.path = path
        self.delay_s = delay_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.write(str(trainer.global_step))
            os.replace(tmp, self.path)
        time.sleep(self.delay_s)
