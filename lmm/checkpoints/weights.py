"""Model weights as safetensors: no pickle on save or load.

LoRA (see ``lmm.model.lora``): files use plain parameter names, never peft's internal ones.
A full file of a model with adapters holds the *merged* weights, so it loads into any model
of the same architecture. A trainable-only file holds the adapters themselves
(``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight``, scale ``alpha/rank`` in the metadata)
and whatever else trained (e.g. the connector): a small file. Loading adapters into a model
that has them restores them; loading them into a plain model merges them into its weights,
so a LoRA stage's output can be the ``init_from`` of any next stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmm.model import lora


def save_weights(
    model: nn.Module,
    path: str | os.PathLike,
    trainable_only: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> int:
    """Write ``model``'s state (or only its trainable parameters) to ``path``; returns #tensors.

    ``state`` replaces ``model.state_dict()`` (e.g. the gathered full state of a sharded model).

    Tied tensors are stored once and recorded as aliases. The file is written to a
    temporary name and renamed, so a crash mid-save never leaves a half-written file.
    """
    layers = lora.lora_layers(model)
    state = model.state_dict() if state is None else state
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    renamed: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        prefix, part = lora.split_key(key, layers)
        if part in ("lora_A", "lora_B") and not trainable_only:
            continue  # a full file holds the merged weight instead
        if part == "base" and not trainable_only and key == f"{prefix}.base_layer.weight":
            t = lora.merged_weight(layers[prefix])
        renamed[lora.file_key(key, layers)] = t
    adapted = {k[0] for k in map(lora.adapter_file_key, renamed) if k}
    scalings = {name: s for name, s in lora.scalings(layers).items() if name in adapted}

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple], str] = {}
    for name, t in renamed.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in by_storage:
            aliases[name] = by_storage[ident]
        else:
            by_storage[ident] = name
            tensors[name] = t.detach().contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"format": "pt", "lmm_aliases": json.dumps(aliases)}
    if scalings:
        metadata["lmm_lora_scaling"] = json.dumps(scalings)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return len(tensors) + len(aliases)


def load_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a file written by :func:`save_weights` into ``model``.

    Every tensor in the file must match a model parameter and shape (else ``ValueError``);
    model keys absent from the file keep their current (pretrained) values. LoRA adapters
    in the file go into the model's adapters if it has them there, else they are merged
    into the plain layer's weight. Returns the file keys that were loaded.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist (did the earlier stage finish?)"
        )
    layers = lora.lora_layers(model)
    state = model.state_dict()
    by_file_key = {lora.file_key(k, layers): k for k in state}
    found: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        aliases = json.loads(meta.get("lmm_aliases", "{}"))
        scaling = json.loads(meta.get("lmm_lora_scaling", "{}"))
        for key in f.keys():
            found[key] = f.get_tensor(key)
    for alias, target in aliases.items():
        found[alias] = found[target]

    loaded: dict[str, torch.Tensor] = {}
    to_merge: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, t in found.items():
        adapter = lora.adapter_file_key(key)
        if key in by_file_key:
            loaded[by_file_key[key]] = t
        elif adapter and f"{adapter[0]}.weight" in by_file_key:
            to_merge.setdefault(adapter[0], {})[adapter[1]] = t
        else:
            unexpected.append(key)
    if unexpected:
        unexpected.sort()
        raise ValueError(
            f"{path}: {len(unexpected)} tensor(s) match no model parameter, e.g. {unexpected[:3]}"
        )
    bad = [k for k, v in loaded.items() if v.shape != state[k].shape]
    if bad:
        first = bad[0]
        raise ValueError(
            f"{path}: shape mismatch for {bad[:3]} (file {loaded[first].shape} vs model {state[first].shape})"
        )
    for name, pair in to_merge.items():
        weight_key = by_file_key[f"{name}.weight"]
        if set(pair) != {"lora_A", "lora_B"} or name not in scaling:
            raise ValueError(
                f"{path}: adapter of {name!r} is incomplete (needs lora_A, lora_B and its scale)"
            )
        base = loaded.get(weight_key, state[weight_key])
        delta = scaling[name] * (pair["lora_B"].float() @ pair["lora_A"].float())
        if delta.shape != base.shape:
            raise ValueError(
                f"{path}: adapter of {name!r} gives {tuple(delta.shape)}, the weight is {tuple(base.shape)}"
            )
        loaded[weight_key] = (base.float() + delta).to(base.dtype)
    model.load_state_dict(loaded, strict=False)
    return sorted(found)
