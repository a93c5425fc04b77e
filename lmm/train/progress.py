"""Progress lines a person can read in a log file (the rich progress bar only draws on a TTY)."""

from __future__ import annotations

import sys
import time

from lightning.pytorch import Callback


class ProgressLog(Callback):
    """Every ``every_n_steps`` optimizer steps print step, loss, throughput and ETA.

    Args:
        every_n_steps: Steps between lines.
        only_without_tty: Stay quiet when stdout is a terminal (the progress bar shows it).
    """

    def __init__(self, every_n_steps: int = 50, only_without_tty: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.only_without_tty = only_without_tty
        self._start = 0.0
        self._samples = 0

    def _active(self, trainer) -> bool:
        return trainer.is_global_zero and not (self.only_without_tty and sys.stdout.isatty())

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch.get("size", 0) if isinstance(batch, dict) else 0
        step = trainer.global_step
        if not self._active(trainer) or step == 0 or step % self.every_n_steps:
            return
        elapsed = time.perf_counter() - self._start
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"[{trainer.state.fn.value}] step {step}" + (f"/{total}" if total else "")]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{self._samples / elapsed:.1f} samples/s")
        parts.append(
            f"{elapsed:.0f}s" + (f" | eta {(total - step) * elapsed / step:.0f}s" if total else "")
        )
        print(" | ".join(parts), flush=True)
