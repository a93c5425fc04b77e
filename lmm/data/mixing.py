"""Weighted shard-set mixes and the deterministic epoch plan behind exact resume.

The plan of an epoch is a pure function of (shard index, weights, seed, epoch):

1. every shard set contributes ``weight`` passes over its samples: whole passes for the
   integer part, and for the fraction a fresh seeded subset each epoch (exactly
   ``round(frac x n)`` samples, so the epoch length never changes);
2. each pass over a shard is a seeded permutation of its samples (a "unit");
   the units of all sets are shuffled together, so sets interleave shard by shard;
3. the concatenated sequence is cut into ``world_size`` equal contiguous ranges of
   ``K x batch_size`` samples (the few left over are dropped for this epoch), so ranks never
   share a sample and all get exactly ``K`` batches: no DDP rank waits at epoch end;
4. optionally, within windows of ``group_window`` batches, samples are sorted by
   (has image, length) and cut into batches, whose order is then shuffled (LLaVA's
   ``group_by_modality_length``, at the granularity of a window).

A position in the epoch is then just "batches consumed", which is what the DataModule saves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from lmm.data.manifest import ShardInfo, index_shards
from lmm.data.shards import expand_shards


@dataclass
class ShardSet:
    """One set of training shards in a weighted mix.

    Args:
        shards: Shard pattern(s) (brace/glob), e.g. ``data/llava665k/shard-*.tar``. A
            ``manifest.json`` from ``data_prep`` next to the shards gives their sample counts
            and lengths; without one the tars' headers are read at start.
        weight: Passes over this set per epoch of the mix: ``1.0`` = every sample once,
            ``2.0`` = every sample twice, ``0.5`` = a different random half each epoch.
        name: Name used in messages (default: the first pattern).
    """

    shards: Union[str, list[str]]
    weight: float = 1.0
    name: Optional[str] = None

    @property
    def patterns(self) -> list[str]:
        return [self.shards] if isinstance(self.shards, str) else list(self.shards)


def as_shard_sets(
    train: list[Union[str, ShardSet, dict]], option: str = "data.train"
) -> list[ShardSet]:
    """The config's ``train`` list -> shard sets; a plain pattern is a set of weight 1."""
    sets = []
    for i, item in enumerate(train):
        if isinstance(item, str):
            item = ShardSet(shards=item)
        elif isinstance(item, dict):
            unknown = set(item) - {"shards", "weight", "name"}
            if unknown or "shards" not in item:
                raise ValueError(
                    f"{option}[{i}]: expected {{shards, weight?, name?}}, got keys {sorted(item)}"
                )
            item = ShardSet(**item)
        if not isinstance(item, ShardSet):
            raise ValueError(
                f"{option}[{i}]: expected a shard pattern or {{shards, weight}}, got {item!r:.80}"
            )
        if not item.weight >= 0:
            raise ValueError(f"{option}[{i}].weight must be >= 0, got {item.weight}")
        sets.append(item)
    return sets


def _rng(*key: int) -> np.random.Generator:
    # SeedSequence over a tuple of ints: independent, reproducible streams per (seed, epoch, ...).
    return np.random.default_rng([int(k) % (2**32) for k in key])


class MixIndex:
    """Compact, picklable index of a weighted mix: shards, per-sample image counts and lengths.

    Samples are addressed by a global id: ``offsets[shard] + position in the shard``.
    """

    def __init__(
        self, sets: list[ShardSet], *, need_tokens: bool = False, option: str = "data.train"
    ) -> None:
        if not sets:
            raise ValueError(f"{option}: no training shards configured")
        self.names: list[str] = []
        self.weights: list[float] = []
        infos: list[ShardInfo] = []
        source: list[int] = []
        for i, s in enumerate(sets):
            urls = expand_shards(s.patterns, f"{option}[{i}]")
            for url in urls:
                if "://" in url:
                    raise ValueError(
                        f"{option}[{i}]: {url} is not a local file; training reads samples by tar offset "
                        "(exact resume), so shards must be on a local or mounted file system"
                    )
            infos += index_shards(urls, need_tokens=need_tokens)
            source += [i] * len(urls)
            self.names.append(s.name or s.patterns[0])
            self.weights.append(float(s.weight))
        self.urls = [info.url for info in infos]
        self.counts = np.asarray([info.num_samples for info in infos], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.source = np.asarray(source, dtype=np.int64)
        self.images = np.concatenate([info.images for info in infos] or [np.zeros(0, np.int32)])
        self.tokens = (
            np.concatenate([info.tokens for info in infos]) if need_tokens and infos else None
        )
        for i, name in enumerate(self.names):
            if self.weights[i] > 0 and self.counts[self.source == i].sum() == 0:
                raise ValueError(f"{option}[{i}] ({name}): its shards hold no samples")

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    def source_size(self, i: int) -> int:
        return int(self.counts[self.source == i].sum())

    def epoch_size(self) -> int:
        """Samples per epoch of the mix (the same every epoch)."""
        total = 0
        for i, w in enumerate(self.weights):
            n = self.source_size(i)
            total += int(w) * n + int(round((w - int(w)) * n))
        return total

    def shard_of(self, gids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, gids, side="right") - 1

    def fingerprint(self) -> str:
        """Identifies the mix (shard names, counts, weights), not where the files live."""
        desc = [
            [u.rsplit("/", 1)[-1] for u in self.urls],
            self.counts.tolist(),
            self.source.tolist(),
            self.weights,
        ]
        return hashlib.sha1(json.dumps(desc).encode()).hexdigest()[:16]

    # -- the plan -----------------------------------------------------------------------------

    def epoch_sequence(self, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
        """Global ids of one epoch, in order (see the module docstring)."""
        units: list[np.ndarray] = []
        for s, weight in enumerate(self.weights):
            shards = np.flatnonzero(self.source == s)
            whole, frac = int(weight), weight - int(weight)
            n = self.source_size(s)
            subset: Optional[np.ndarray] = None
            passes = whole + (1 if frac > 0 else 0)
            for r in range(passes):
                if (
                    r == whole
                ):  # the fractional pass: exactly round(frac * n) samples, new each epoch
                    subset = np.zeros(n, dtype=bool)
                    subset[_rng(seed, epoch, s, r, 1).permutation(n)[: int(round(frac * n))]] = True
                local = 0
                for k in shards:
                    count = int(self.counts[k])
                    ids = (
                        _rng(seed, epoch, s, r, 2, k).permutation(count)
                        if shuffle
                        else np.arange(count)
                    )
                    if subset is not None:
                        ids = ids[subset[local + ids]]
                    local += count
                    if len(ids):
                        units.append(self.offsets[k] + ids)
        if not units:
            return np.zeros(0, dtype=np.int64)
        order = _rng(seed, epoch, 3).permutation(len(units)) if shuffle else range(len(units))
        return np.concatenate([units[i] for i in order])

    def batches_per_rank(self, batch_size: int, world_size: int) -> int:
        return (self.epoch_size() // world_size) // batch_size

    def rank_plan(
        self,
        epoch: int,
        seed: int,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        shuffle: bool = True,
        group_window: int = 0,
        image_tokens: int = 0,
    ) -> np.ndarray:
        """``[K, batch_size]`` global ids: this rank's batches of the epoch, in order."""
        seq = self.epoch_sequence(epoch, seed, shuffle)
        k = self.batches_per_rank(batch_size, world_size)
        mine = seq[rank * k * batch_size : (rank + 1) * k * batch_size]
        if group_window > 0 and k > 0:
            mine = self._group(mine, epoch, seed, rank, batch_size, group_window, image_tokens)
        return mine.reshape(k, batch_size)

    def lengths(self, image_tokens: int) -> np.ndarray:
        """Sequence length per sample: text tokens + images x tokens per image."""
        if self.tokens is None:
            raise ValueError(
                "length grouping needs token counts (MixIndex built with need_tokens=True)"
            )
        return self.tokens.astype(np.int64) + self.images.astype(np.int64) * image_tokens

    def _group(
        self,
        ids: np.ndarray,
        epoch: int,
        seed: int,
        rank: int,
        batch_size: int,
        window: int,
        image_tokens: int,
    ) -> np.ndarray:
        return group_by_length(
            ids,
            self.lengths(image_tokens),
            self.images > 0,
            batch_size,
            window,
            lambda w, n: _rng(seed, epoch, rank, w, 4).permutation(n),
        )


def group_by_length(
    ids: np.ndarray,
    lengths: np.ndarray,
    has_image: np.ndarray,
    batch_size: int,
    window: int,
    permutation: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """``ids`` reordered so each batch holds samples of one modality and similar length:
    within each window of ``window x batch_size`` samples, sort by (modality, length), cut
    into batches and put the window's batches in the order ``permutation(w, n_batches)``.
    ``lengths``/``has_image`` are indexed by id; ``len(ids)`` must be a multiple of the batch."""
    out = []
    size = window * batch_size
    for w, start in enumerate(range(0, len(ids), size)):
        chunk = ids[start : start + size]
        # Modality first, then length; a stable sort keeps the shuffled order among equals.
        order = np.lexsort((lengths[chunk], has_image[chunk]))
        batches = chunk[order].reshape(-1, batch_size)
        out.append(batches[permutation(w, len(batches))].reshape(-1))
    return np.concatenate(out)


def describe_mix(index: MixIndex, batch_size: int, world_size: int) -> dict[str, Any]:
    """A summary for logs: per-set samples and epoch size."""
    return {
        "sets": {
            name: {"samples": index.source_size(i), "weight": index.weights[i]}
            for i, name in enumerate(index.names)
        },
        "samples_per_epoch": index.epoch_size(),
        "batches_per_rank": index.batches_per_rank(batch_size, world_size),
    }
