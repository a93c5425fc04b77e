"""How Lightning checkpoints are written and read: atomically, and never by unpickling code.

``LMMCLI`` installs :class:`SafeCheckpointIO` in every Trainer it builds (and
``lmm.train.fault_tolerance.FaultTolerantCheckpoint`` in any Trainer it joins), so ``ModelCheckpoint`` saves and
``--ckpt_path`` loads go through it.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lmm.checkpoints.atomic import atomic_write
from lmm.errors import UnsafeCheckpointError


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with two guarantees.

    - Saving writes a temporary file in the checkpoint's directory, fsyncs it and renames it
      over the target (``lmm.checkpoints.atomic``): a crash mid-save leaves the previous checkpoint intact.
      (Lightning's own writer stages in the system temp dir, which on another file system turns
      the final move into a copy that a crash can cut short.) Remote URLs keep Lightning's
      writer.
    - Loading always uses ``torch.load(weights_only=True)``: tensors, containers and plain
      values only. A checkpoint holding any other object is refused with
      :class:`UnsafeCheckpointError`; asking for ``weights_only=False`` is an error.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (path {path})")
        atomic_write(path, lambda f: torch.save(checkpoint, f))

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
        except pickle.UnpicklingError as err:
            raise refusal(path, err) from None


def refusal(path: Any, err: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """The error for a checkpoint that ``torch.load(weights_only=True)`` would not load."""
    return UnsafeCheckpointError(
        f"{path}: refused: it holds pickled Python objects that only unpickling (running code) could restore, "
        "and lmm loads checkpoints with torch.load(weights_only=True). Re-save it with tensors, containers and "
        f"plain values only. ({str(err).splitlines()[0]})"
    )


def use_safe_checkpoint_io(trainer: Any) -> None:
    """Route ``trainer``'s checkpoint reads and writes through :class:`SafeCheckpointIO`,
    unless a custom CheckpointIO (e.g. a sharded strategy's) is configured."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()
