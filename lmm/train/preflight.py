"""Before the first step: every checkpoint directory of the run can be written and has room for
the checkpoints the run keeps, estimated from the state that will be saved; else the run stops
with the numbers instead of failing at its first save, maybe hours later."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lmm.checkpoints.disk import (
    BYTES_PER_TENSOR,
    FIXED_BYTES,
    access_problem,
    free_bytes,
    human,
    tensors_bytes,
)
from lmm.errors import CheckpointWriteError
from lmm.train.fault_tolerance import FaultTolerantCheckpoint

log = logging.getLogger("lmm")


def state_slots(optimizer: Any) -> int:
    """Tensors the optimizer keeps per trainable parameter, each the parameter's size: AdamW's
    two moments (three with amsgrad), SGD's momentum buffer; unknown optimizers count as Adam."""
    groups = optimizer.param_groups
    name = type(optimizer).__name__
    if name in ("Adam", "AdamW"):
        return 3 if any(g.get("amsgrad") for g in groups) else 2
    if name == "SGD":
        return 1 if any(g.get("momentum") for g in groups) else 0
    return 2


def estimate_checkpoint_bytes(module: Any, optimizers: Iterable[Any]) -> int:
    """Bytes of one Lightning checkpoint of ``module``: the weights it saves (the trainable ones
    only under ``checkpoint_trainable_only``), the optimizer state (empty until the first step,
    so predicted from :func:`state_slots`) and the small rest (loop, data and random state)."""
    state = module.state_dict()
    if getattr(module, "checkpoint_trainable_only", False):
        trained = {n for n, p in module.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    total = tensors_bytes(state.values()) + FIXED_BYTES
    for optimizer in optimizers:
        slots = state_slots(optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and slots:
                    data = p.numel() * p.element_size()
                    total += slots * (data + BYTES_PER_TENSOR) + BYTES_PER_TENSOR  # + its step
    return total


def copies_at_a_save(callback: ModelCheckpoint) -> int:
    """Checkpoints of ``callback`` on disk at once at most, the one being written included."""
    if isinstance(callback, FaultTolerantCheckpoint):
        # last.ckpt + its replacement being written (previous.ckpt is deleted before, see
        # keep_previous), + the step=N.ckpt written just before under keep_all.
        return 2 + (callback.save_top_k != 0)
    kept = 1 if callback.save_top_k < 0 else callback.save_top_k  # keep-all: count the next one
    return kept + bool(callback.save_last) + 1


def reusable_bytes(callback: ModelCheckpoint, directory: Path) -> int:
    """Bytes of checkpoints already in ``directory`` that the run's saves replace."""
    if isinstance(callback, FaultTolerantCheckpoint):
        names = [Path(callback.last_path).name, Path(callback.previous_path).name]
        paths = [directory / n for n in names]
    elif callback.save_top_k > 0 or callback.save_last:
        paths = [p for p in directory.iterdir() if p.suffix == ".ckpt"]
    else:
        paths = []
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():  # a sharded checkpoint
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


def check_directory(callback: ModelCheckpoint, each: int) -> Optional[str]:
    """Why ``callback``'s directory cannot take this run's checkpoints of ``each`` bytes; None if
    it can."""
    if callback.dirpath is None or "://" in str(callback.dirpath):
        return None  # remote storage: no local file system to ask
    directory = Path(callback.dirpath)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".lmm-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{directory}: cannot write checkpoints there: {access_problem(directory, err)}"
    copies = copies_at_a_save(callback)
    needed = copies * each
    free = free_bytes(directory)
    reusable = min(reusable_bytes(callback, directory), (copies - 1) * each)
    log.info(
        "checkpoints in %s: about %s each, %d at once at most; %s free",
        directory, human(each), copies, human(free),
    )  # fmt: skip
    if free + reusable >= needed:
        return None
    mine = f" + {human(reusable)} of this run's checkpoints already there" if reusable else ""
    return (
        f"{directory}: not enough space for this run's checkpoints: a save needs room for {copies} "
        f"checkpoints of about {human(each)} each (the one being written included) = {human(needed)}, "
        f"and there are {human(free)} free{mine}. Free space there or set the checkpoint "
        "directory (dirpath) to a disk with room."
    )


class CheckpointPreflight(Callback):
    """Checks every checkpoint directory of a fit before its first step (``python -m lmm fit``
    adds it): writable, and room for the checkpoints the run keeps at once (see
    :func:`copies_at_a_save`; each estimated by :func:`estimate_checkpoint_bytes`). Else a
    :class:`~lmm.errors.CheckpointWriteError` with the numbers stops the run on every rank."""

    def on_fit_start(self, trainer, pl_module) -> None:
        callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        if not callbacks:
            return
        each = estimate_checkpoint_bytes(pl_module, trainer.optimizers)
        problems = []
        if trainer.is_global_zero:  # one directory for all ranks: one process looks
            problems = [p for c in callbacks if (p := check_directory(c, each)) is not None]
        problems = trainer.strategy.broadcast(problems)
        if problems:
            raise CheckpointWriteError(" ".join(problems))
