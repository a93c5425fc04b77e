"""Why a checkpoint did not load: damaged bytes or pickled objects, and which older checkpoint
next to it does load.

``torch.load(weights_only=True)`` raises an ``UnpicklingError`` both for a well-formed checkpoint
that holds a pickled object (unsafe: refused) and for bytes that are no checkpoint at all (random
bytes read as pickle opcodes), and other errors (``EOFError``, ``RuntimeError`` from the zip
reader, ``OSError``) for empty or truncated files. So after a failed load the file's structure is
checked on its own: a torch zip archive whose records pass their checksums and whose
``data.pkl`` is a complete pickle is well-formed, anything else is damaged.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from lmm.errors import CorruptCheckpointError, UnsafeCheckpointError

# What a resume can fall back to: other checkpoints of the same directory, newest first.
MAX_ALTERNATIVES_CHECKED = 8
# The first pickle of a checkpoint in torch's legacy (pre-zip) format is this number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _complete_pickle(stream: io.BufferedIOBase) -> tuple[bool, list]:
    """Whether ``stream`` starts with a pickle that parses to its STOP opcode; and its arguments."""
    args = []
    try:
        for op, arg, _ in pickletools.genops(stream):
            args.append(arg)
            if op.name == "STOP":
                return True, args
    except Exception:  # genops raises ValueError, KeyError, ... on garbage
        pass
    return False, args


def damage(path: str | os.PathLike) -> Optional[str]:
    """What is wrong with the bytes of the checkpoint file ``path``; None if it is a well-formed
    torch checkpoint (whatever objects it holds)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            ok, args = _complete_pickle(f)
        if ok and LEGACY_MAGIC in args:
            return None  # torch's legacy format (not a zip); its contents are judged by torch.load
        return f"not a torch checkpoint archive ({size} bytes): truncated or overwritten"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every record and compares its CRC-32
            if bad is not None:
                return f"the record {bad} fails its checksum: the file was altered after it was written"
            index = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not index:
                return "a zip archive without data.pkl: not a torch checkpoint"
            ok, _ = _complete_pickle(io.BytesIO(z.read(index[0])))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"an unreadable zip archive ({err})"
    if not ok:
        return f"its {index[0]} is not a complete pickle"
    return None


def refusal(path: Any, err: BaseException) -> UnsafeCheckpointError:
    """The error for a well-formed checkpoint that ``torch.load(weights_only=True)`` would not load."""
    return UnsafeCheckpointError(
        f"{path}: refused: it holds pickled Python objects that only unpickling (running code) could restore, "
        "and lmm loads checkpoints with torch.load(weights_only=True). Re-save it with tensors, containers and "
        f"plain values only. ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    )


def saved_step(path: str | os.PathLike) -> Optional[int]:
    """The ``global_step`` of a checkpoint file that loads (tensors memory-mapped, not read),
    else None."""
    try:
        ckpt = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception:  # any reason not to load is a reason not to propose it
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else -1


def loadable_sibling(path: str | os.PathLike) -> Optional[tuple[Path, int]]:
    """The other checkpoint file in ``path``'s directory that loads and is furthest along:
    (path, global_step), or None."""
    path = Path(path)
    try:
        others = [
            p
            for p in path.parent.iterdir()
            if p.suffix == ".ckpt" and p.is_file() and not p.name.startswith(".") and p != path
        ]
    except OSError:
        return None
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    found = [(p, saved_step(p)) for p in others[:MAX_ALTERNATIVES_CHECKED]]
    found = [(p, s) for p, s in found if s is not None]
    return max(found, key=lambda ps: ps[1]) if found else None


def fallback_advice(path: str | os.PathLike, sibling: Optional[tuple[Path, int]]) -> str:
    """What to resume from instead of the unusable checkpoint ``path``, given
    :func:`loadable_sibling`'s answer."""
    path = Path(path)
    if sibling is None:
        return (
            f"No other checkpoint in {path.parent} loads: to start from scratch, move {path.name} "
            "away (or drop --ckpt_path)."
        )
    other, step = sibling
    at = f" (step {step})" if step >= 0 else ""
    return f"{other}{at} loads: resume from it with --ckpt_path {other}."


def load_error(path: Any, err: Exception) -> Optional[Exception]:
    """The error to show for ``torch.load(path, weights_only=True)`` having raised ``err``: a
    :class:`CorruptCheckpointError` for damaged bytes, an :class:`UnsafeCheckpointError` for a
    well-formed file the weights-only unpickler refused; None when the file's bytes are not to
    blame (missing, unreadable, or torch failing for another reason)."""
    if "://" in str(path) or not Path(path).is_file():
        return None
    try:
        damaged = damage(path)
    except OSError:
        return None  # unreadable for another reason (permissions): torch's error says it
    if damaged is None and not isinstance(err, pickle.UnpicklingError):
        return None  # well-formed: torch failed for another reason (memory, ...), its error says it
    sibling = loadable_sibling(path)
    advice = fallback_advice(path, sibling)
    if damaged is not None:
        return CorruptCheckpointError(f"{path}: corrupt checkpoint: {damaged}. {advice}")
    unsafe = refusal(path, err)
    if sibling is not None:
        unsafe.args = (f"{unsafe} {advice}",)
    return unsafe
