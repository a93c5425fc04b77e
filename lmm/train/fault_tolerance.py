"""Fault-tolerant fit: ``last.ckpt`` kept current by steps and by time, and written once more
when the process is asked to stop (SIGTERM: preemption), so ``--ckpt_path last`` loses little.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmm.checkpoints.disk import NO_PERMISSION, NO_SPACE
from lmm.checkpoints.lightning_io import use_safe_checkpoint_io
from lmm.train.ranks import hold_child_ranks

log = logging.getLogger("lmm")

# Exit status of a fit stopped by SIGTERM after its final checkpoint (128 + SIGTERM, as a shell
# reports it): not 0, so a job runner restarts it rather than taking it as finished.
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM
# The checkpoint before last.ckpt (keep_previous). Its name must not start with "last": Lightning's
# --ckpt_path last takes the newest file matching last*.ckpt.
PREVIOUS_NAME = "previous.ckpt"


class FaultTolerantCheckpoint(ModelCheckpoint):
    """Keeps ``DIRPATH/last.ckpt`` current so that ``python -m lmm fit ... --ckpt_path last``
    resumes a run that was killed, with the batches and weights the uninterrupted run would
    have had (model, optimizer, LR scheduler, step, data position and random state).

    Checkpoints are written only at the end of an optimizer step (never between the micro-batches
    of an accumulated step), atomically (``lmm.checkpoints.lightning_io.SafeCheckpointIO``: a crash mid-save
    leaves the previous ``last.ckpt``), and once more when training ends. Needs
    ``trainer.enable_checkpointing: true``.

    Args:
        dirpath: Directory of ``last.ckpt``: one per run, the same across restarts (``--ckpt_path
            last`` looks there; the first run, with none there yet, starts from scratch).
        every_n_steps: Save every this many optimizer steps (0: not by steps).
        every_n_minutes: Save when this many minutes of training passed since the last save
            (0: not by time). Both may be set; whichever comes first saves.
        on_sigterm: On SIGTERM, finish the optimizer step in progress (while validation runs,
            the next one), save, and stop with exit status 143; with several processes every
            rank saves its part first, and the launching process exits after all others. Leave
            the scheduler's grace period above one step's time. ``false``: Lightning's default,
            stop without saving.
        keep_all: Also keep every checkpoint as ``step=N.ckpt`` (each save then writes two files).
        keep_previous: Keep the checkpoint that ``last.ckpt`` replaces as ``previous.ckpt`` (a
            hard link made before the save, so no copy is written): a resume from a damaged
            ``last.ckpt`` can fall back to it. The one before is deleted first, so a save never
            needs room for more than two checkpoints, as without it; between saves the
            directory holds two instead of one. Single-file checkpoints only (not a sharded
            checkpoint directory).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 0,
        every_n_minutes: float = 30.0,
        on_sigterm: bool = True,
        keep_all: bool = False,
        keep_previous: bool = True,
    ) -> None:
        if every_n_steps < 0 or every_n_minutes < 0:
            raise ValueError(
                f"every_n_steps ({every_n_steps}) and every_n_minutes ({every_n_minutes}) must be >= 0"
            )
        # The triggers below replace ModelCheckpoint's (which allows steps or time, not both).
        super().__init__(
            dirpath=dirpath,
            filename="{step}",
            save_last=True,
            save_top_k=-1 if keep_all else 0,
            every_n_train_steps=0,
            every_n_epochs=0,
            enable_version_counter=False,
        )
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.on_sigterm = on_sigterm
        self.keep_previous = keep_previous
        self._sigterm = False
        self._previous_handler: Any = None
        self._last_save = time.monotonic()
        self._seen_step = 0

    @property
    def last_path(self) -> str:
        return self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    @property
    def previous_path(self) -> str:
        return str(Path(self.last_path).with_name(PREVIOUS_NAME))

    def setup(self, trainer, pl_module, stage: str) -> None:
        use_safe_checkpoint_io(trainer)  # also when the Trainer was not built by LMMCLI
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save = time.monotonic()
        self._seen_step = trainer.global_step
        self._sigterm = False
        if self.on_sigterm:
            # Lightning's handler (installed just before training) would stop at the end of the
            # current micro-batch, mid accumulation; this one only takes note.
            self._previous_handler = signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped, self._seen_step = trainer.global_step != self._seen_step, trainer.global_step
        if not stepped:
            return
        strategy = trainer.strategy
        # Collective decisions: every rank takes part in a save, and in the stop after it.
        # (Lightning's flag: a SIGTERM that came before this callback's handler was in place.)
        stop = self.on_sigterm and (self._sigterm or trainer.received_sigterm)
        stop = strategy.reduce_boolean_decision(stop, all=False)
        by_time = (
            self.every_n_minutes > 0
            and time.monotonic() - self._last_save >= 60 * self.every_n_minutes
        )
        by_time = strategy.reduce_boolean_decision(by_time, all=False)
        by_steps = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        if stop:
            hold_child_ranks(trainer)  # rank 0 answers for the others' exit (lmm.train.ranks)
        if (by_steps or by_time or stop) and not self._should_skip_saving_checkpoint(trainer):
            self._save(trainer)
        if (
            stop and not 0 < trainer.max_steps <= trainer.global_step
        ):  # at the last step: finish instead
            if trainer.is_global_zero:
                print(
                    f"SIGTERM: saved step {trainer.global_step} to {self.last_path}; continue with "
                    "--ckpt_path last",
                    flush=True,
                )
            raise SIGTERMException

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()
        if not self._should_skip_saving_checkpoint(trainer):
            self._save(trainer)  # the final state, so a longer run can continue from it

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if (
            self._previous_handler is not None
            and signal.getsignal(signal.SIGTERM) == self._note_sigterm
        ):
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None

    def _save(self, trainer) -> None:
        if self.keep_previous and trainer.is_global_zero:
            self._keep_previous()
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)  # step=N.ckpt under keep_all
        self._save_last_checkpoint(trainer, candidates)
        self._last_save = time.monotonic()
        log.info("saved checkpoint of step %d to %s", trainer.global_step, self.last_path)

    def _keep_previous(self) -> None:
        """Make ``previous.ckpt`` another name of the current ``last.ckpt``, which the atomic
        save then replaces by a new file; last.ckpt itself is never absent."""
        last, previous = Path(self.last_path), Path(self.previous_path)
        if not last.is_file():
            return  # the first save, or a sharded checkpoint (a directory)
        try:
            previous.unlink(missing_ok=True)
            os.link(last, previous)
        except OSError as err:
            if err.errno not in (errno.EROFS, *NO_PERMISSION, *NO_SPACE):
                # e.g. a file system without hard links; a fault of the directory itself is
                # reported by the save that follows.
                log.warning("%s is not kept as %s (%s)", last, previous.name, err)
