"""Records gathered from every rank, put back in their original order."""

from __future__ import annotations

from typing import Any, Iterable

import torch


def sort_by_order(parts: Iterable[list[dict]], key: str = "order") -> list[dict]:
    """Concatenate per-rank record lists and sort them by ``key`` (then drop it).

    Records without a key (None) keep their gathered order after the keyed ones.
    """
    records = [r for part in parts for r in part]
    keyed = [r for r in records if r.get(key) is not None]
    rest = [r for r in records if r.get(key) is None]
    keyed.sort(key=lambda r: tuple(r[key]) if isinstance(r[key], (list, tuple)) else (r[key],))
    return [{k: v for k, v in r.items() if k != key} for r in keyed + rest]


def gather_in_order(records: list[dict], key: str = "order") -> list[dict]:
    """All ranks' records, in their original order (every rank gets the full list)."""
    parts: list[Any] = [records]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, records)
    return sort_by_order(parts, key)
