"""Model weights as safetensors: no pickle on save or load."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def save_weights(model: nn.Module, path: str | os.PathLike, trainable_only: bool = False) -> int:
    """Write ``model``'s state (or only its trainable parameters) to ``path``; returns #tensors.

    Tied tensors are stored once and recorded as aliases. The file is written to a
    temporary name and renamed, so a crash mid-save never leaves a half-written file.
    """
    state = model.state_dict()
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple], str] = {}
    for name, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in by_storage:
            aliases[name] = by_storage[ident]
        else:
            by_storage[ident] = name
            tensors[name] = t.detach().contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "lmm_aliases": json.dumps(aliases)})
    os.replace(tmp, path)
    return len(tensors) + len(aliases)


def load_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a file written by :func:`save_weights` into ``model``.

    Every tensor in the file must match a model key and shape (else ``ValueError``);
    model keys absent from the file keep their current (pretrained) values.
    Returns the loaded keys.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist (did the earlier stage finish?)")
    state = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("lmm_aliases", "{}"))
        for key in f.keys():
            loaded[key] = f.get_tensor(key)
    for alias, target in aliases.items():
        loaded[alias] = loaded[target]
    unexpected = sorted(set(loaded) - set(state))
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensor(s) match no model parameter, e.g. {unexpected[:3]}")
    bad = [k for k, v in loaded.items() if v.shape != state[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {bad[:3]} (file {loaded[bad[0]].shape} vs model {state[bad[0]].shape})")
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)
