"""Atomic file replacement: a path holds its old content or the complete new one, never a part.

Kept free of heavy imports so a test can crash a process in the middle of a write cheaply.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Callable


def partial_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` stages ``path``'s new content: a hidden sibling (same file
    system, so the rename is atomic) whose name matches no ``*.ckpt`` or ``last*`` pattern."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, flush it to disk, then rename it
    over ``path``.

    A crash at any point leaves ``path`` as it was (plus, after a hard kill, a stale
    ``.NAME.partial`` that the next write replaces). One writer per path at a time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        # The write's error is the one to report: a cleanup that fails too (a read-only file
        # system answers EROFS even for a file that was never created) only leaves a stale
        # partial file, which the next write replaces.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (a power loss could otherwise undo it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. a platform without directory handles: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
