"""Streaming WebDataset shards: split by node and worker, shuffle, encode and batch in workers."""
from __future__ import annotations

import glob
import os
import random
from collections import Counter
from typing import Any, Callable, Iterator

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmm.data.errors import SampleError


def expand_shards(patterns: list[str], option: str) -> list[str]:
    """Brace and glob patterns -> sorted shard paths; a pattern matching nothing is an error."""
    urls: list[str] = []
    for pattern in patterns:
        found = []
        for part in braceexpand.braceexpand(pattern):
            found += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        found = [u for u in found if "://" in u or os.path.exists(u)]
        if not found:
            raise FileNotFoundError(f"{option}: no shard matches {pattern!r} (run data preparation first?)")
        urls += found
    return urls


def shard_slice(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This (rank, worker)'s disjoint share of the shard list."""
    return urls[rank::world_size][worker::num_workers]


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Iterates encoded batches from shards.

    Batching happens here, in the worker, so decode + transform + tokenize + collate run in
    parallel; the DataLoader only moves finished batches. Skipped samples are counted by
    reason and attached to the next batch (``batch["skipped"]``), so the counts reach the
    training process whatever worker saw them.
    """

    def __init__(
        self,
        urls: list[str],
        encode: Callable[[dict], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        *,
        shuffle_buffer: int = 0,
        shuffle_shards: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.encode = encode
        self.collate = collate
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.extra = extra or {}
        self.epoch = 0

    def _my_urls(self) -> tuple[list[str], int]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        return shard_slice(urls, self.rank, self.world_size, worker, num_workers), worker

    def __iter__(self) -> Iterator[dict]:
        urls, worker = self._my_urls()
        skipped: Counter[str] = Counter()

        def on_read_error(exn: Exception) -> bool:
            skipped["shard_read"] += 1
            return True  # keep going with the next member / shard

        samples = wds.tarfile_to_samples(handler=on_read_error)({"url": u} for u in urls)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        batch: list[dict] = []
        for raw in samples:
            try:
                batch.append(self.encode(raw))
            except SampleError as err:
                skipped[err.reason] += 1
                continue
            if len(batch) == self.batch_size:
                yield self._finish(batch, skipped)
                batch, skipped = [], Counter()
        if batch or skipped:
            yield self._finish(batch, skipped)

    def _finish(self, batch: list[dict], skipped: Counter) -> dict:
        out = self.collate(batch)
        out["skipped"] = dict(skipped)
        out.update(self.extra)
        return out


class EpochLoader(DataLoader):
    """A DataLoader that tells its ShardStream which epoch starts, so shard order and
    shuffling differ per epoch yet stay reproducible (workers get a fresh copy each epoch)."""

    def __iter__(self):
        self.dataset.epoch = getattr(self, "_next_epoch", 0)
        self._next_epoch = self.dataset.epoch + 1
        return super().__iter__()


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    return EpochLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
