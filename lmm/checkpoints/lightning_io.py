"""How Lightning checkpoints are written and read: atomically, and never by unpickling code.

``LMMCLI`` installs :class:`SafeCheckpointIO` in every Trainer it builds (and
``lmm.train.fault_tolerance.FaultTolerantCheckpoint`` in any Trainer it joins), so ``ModelCheckpoint`` saves and
``--ckpt_path`` loads go through it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lmm.checkpoints.atomic import atomic_write
from lmm.checkpoints.disk import checkpoint_bytes, write_error
from lmm.checkpoints.integrity import load_error
from lmm.errors import UnsafeCheckpointError


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with two guarantees.

    - Saving writes a temporary file in the checkpoint's directory, fsyncs it and renames it
      over the target (``lmm.checkpoints.atomic``): a crash mid-save leaves the previous checkpoint intact.
      (Lightning's own writer stages in the system temp dir, which on another file system turns
      the final move into a copy that a crash can cut short.) Remote URLs keep Lightning's
      writer. A write that fails for want of space or permission raises
      :class:`~lmm.errors.CheckpointWriteError` naming the file, the directory and the numbers.
    - Loading always uses ``torch.load(weights_only=True)``: tensors, containers and plain
      values only. A checkpoint holding any other object is refused with
      :class:`UnsafeCheckpointError`; asking for ``weights_only=False`` is an error. A damaged
      file (empty, truncated, overwritten) raises :class:`~lmm.errors.CorruptCheckpointError`
      naming an older checkpoint of the same directory that loads.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (path {path})")
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except Exception as err:
            failure = write_error(path, err, needed=checkpoint_bytes(checkpoint))
            if failure is None:
                raise
            raise failure from None

    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise UnsafeCheckpointError(
                f"{path}: loading with weights_only=False could run code stored in the checkpoint; lmm loads "
                "checkpoints with weights_only=True only (drop --weights_only false)"
            )
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except Exception as err:
            failure = load_error(path, err)
            if failure is None:
                raise
            raise failure from None


def use_safe_checkpoint_io(trainer: Any) -> None:
    """Route ``trainer``'s checkpoint reads and writes through :class:`SafeCheckpointIO`,
    unless a custom CheckpointIO (e.g. a sharded strategy's) is configured."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()
