"""Checkpoints and the disk under them: how many bytes one takes, how many are free, and what a
failed write means in words (no space, read-only, no permission) instead of torch's zip-writer
message."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from lmm.errors import CheckpointWriteError

# torch.save writes every tensor as its own zip record (local header, 64-byte alignment, central
# directory entry, its entry in data.pkl): measured at 200-400 bytes per tensor with torch 2.14;
# rounded up, plus room for the pickled scalars, loop and data state, random states.
BYTES_PER_TENSOR = 512
FIXED_BYTES = 64 * 1024

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_PERMISSION = (errno.EACCES, errno.EPERM)


def human(n: float) -> str:
    """``n`` bytes in decimal units, e.g. ``1.2 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def existing_dir(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing ancestor (where a directory about to be made would live)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes an ordinary user may still write on the file system of ``directory``."""
    return shutil.disk_usage(existing_dir(directory)).free


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """What ``torch.save`` writes for these tensors: their data (shared storage once) plus the
    per-record overhead."""
    seen: set[tuple] = set()
    total = 0
    for t in tensors:
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        except (RuntimeError, NotImplementedError):  # e.g. a DTensor: no local storage to share
            key = (id(t),)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size() + BYTES_PER_TENSOR
    return total


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def checkpoint_bytes(checkpoint: dict) -> int:
    """About how many bytes ``torch.save(checkpoint)`` writes."""
    return tensors_bytes(_tensors(checkpoint)) + FIXED_BYTES


def _os_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind ``err`` (torch's zip writer reports a failed write as a RuntimeError
    whose context is the OSError), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def write_error(
    path: str | os.PathLike, err: BaseException, needed: Optional[int] = None
) -> Optional[CheckpointWriteError]:
    """The error to show for a failed write of the checkpoint ``path`` (None: not a file system
    fault). ``needed``: the checkpoint's size, if known."""
    cause = _os_error(err)
    if cause is None:
        return None
    path = Path(path)
    directory = path.parent
    if cause.errno in NO_SPACE:
        size = f"the checkpoint needs about {human(needed)}, " if needed else ""
        return CheckpointWriteError(
            f"{path}: no space left on the device: {size}{human(free_bytes(directory))} free in "
            f"{directory}. Free space there or set the checkpoint directory (dirpath) to a disk "
            f"with room; {path.name} was left as it was."
        )
    return CheckpointWriteError(
        f"{path}: cannot write the checkpoint: {access_problem(directory, cause)}"
    )


def access_problem(directory: Path, cause: OSError) -> str:
    """Why nothing can be written in ``directory``, and what to do, in words."""
    if cause.errno == errno.EROFS:
        return (
            f"{directory} is on a read-only file system. Remount it read-write or set the "
            "checkpoint directory (dirpath) to a writable one."
        )
    if cause.errno in NO_PERMISSION:
        return (
            f"permission denied in {directory} (user id {os.geteuid()}). Make it writable for "
            "this user or set the checkpoint directory (dirpath) to a writable one."
        )
    name = errno.errorcode.get(cause.errno, str(cause.errno))
    return f"{cause.strerror} ({name}) in {directory}."
