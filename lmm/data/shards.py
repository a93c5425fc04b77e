"""Streaming WebDataset shards: split by node and worker, encode and batch in workers.

Two streams:

* :class:`PlannedStream` (training): follows the deterministic epoch plan of
  :class:`lmm.data.mixing.MixIndex` and reads samples by tar offset, so a run stopped
  mid-epoch resumes at exactly the next batch (the position is "batches consumed");
* :class:`ShardStream` (validation/test, or any sequential read): streams shards front to
  back with webdataset, optionally through a shuffle buffer.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import threading
from collections import Counter
from typing import Any, Callable, Iterator

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmm.data.tarindex import TarSamples
from lmm.errors import SampleError


def expand_shards(patterns: list[str], option: str) -> list[str]:
    """Brace and glob patterns -> sorted shard paths; a pattern matching nothing is an error."""
    urls: list[str] = []
    for pattern in patterns:
        found = []
        for part in braceexpand.braceexpand(pattern):
            found += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        found = [u for u in found if "://" in u or os.path.exists(u)]
        if not found:
            raise FileNotFoundError(
                f"{option}: no shard matches {pattern!r} (run data preparation first?)"
            )
        urls += found
    return urls


def shard_slice(
    urls: list[str], rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
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
    reason and attached to the next batch (``batch["skipped"]``, with ``batch["skip_notes"]``:
    ``(reason, message)`` per skip), so they reach the main process whatever worker saw them.
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
        index_samples: bool = False,
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
        # Eval streams tag each sample with its place in the full, unsplit shard list
        # (shard index, position in shard), so results gathered from ranks and workers
        # can be put back in the original order.
        self.index_samples = index_samples
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
        notes: list[tuple[str, str]] = []

        def on_read_error(exn: Exception) -> bool:
            skipped["shard_read"] += 1
            notes.append(("shard_read", str(exn)))
            return True  # keep going with the next member / shard

        samples = wds.tarfile_to_samples(handler=on_read_error)({"url": u} for u in urls)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        batch: list[dict] = []
        shard_index = {u: i for i, u in enumerate(self.urls)}
        seen: Counter[str] = Counter()
        for raw in samples:
            url = raw.get("__url__", "")
            position = seen[url]
            seen[url] += 1
            try:
                item = self.encode(raw)
                if self.index_samples:
                    item["order"] = (shard_index.get(url, -1), position)
                batch.append(item)
            except SampleError as err:
                skipped[err.reason] += 1
                notes.append((err.reason, f"{url}: {err}"))
                continue
            if len(batch) == self.batch_size:
                yield self._finish(batch, skipped, notes)
                batch, skipped, notes = [], Counter(), []
        if batch or skipped:
            yield self._finish(batch, skipped, notes)

    def _finish(self, batch: list[dict], skipped: Counter, notes: list[tuple[str, str]]) -> dict:
        out = self.collate(batch)
        out["skipped"] = dict(skipped)
        out["skip_notes"] = notes
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
        generator=_own_generator(),
        worker_init_fn=_leave_sigterm_to_main,
    )


def _own_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed at every ``iter()``, from the global torch RNG
    unless it has a generator. Ours do: the streams use no random numbers in workers, and a draw
    from the global RNG would shift the training's dropout masks by whether (and how often) a
    loader was iterated, so a resumed run would not repeat the uninterrupted one."""
    return torch.Generator().manual_seed(0)


def _leave_sigterm_to_main(worker_id: int) -> None:
    """A worker ends on a SIGTERM from its main process (the DataLoader's shutdown, as PyTorch's
    own worker handler does) and ignores one from anyone else: a scheduler that signals every
    process of a job (SLURM) must not kill it, which PyTorch would turn into an error in the
    main process before that has written its final checkpoint (``lmm.train.fault_tolerance``). Python handlers
    do not see the sender, so a thread waits for the signal instead."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


# -- training: the planned, resumable stream ---------------------------------------------------------


class _Readers:
    """The shard indexes one worker has open (a batch touches few shards; keep a handful)."""

    def __init__(self, urls: list[str], keep: int = 8) -> None:
        self.urls = urls
        self.keep = keep
        self._open: dict[int, TarSamples | OSError] = {}

    def read(self, shard: int, member: int) -> dict:
        tar = self._open.pop(shard, None)
        if tar is None:
            try:
                tar = TarSamples(self.urls[shard])
            except OSError as err:  # missing or unreadable file: its positions count as shard_read
                tar = err
        self._open[shard] = tar  # most recently used last
        while len(self._open) > self.keep:
            old = self._open.pop(next(iter(self._open)))
            if isinstance(old, TarSamples):
                old.close()
        if isinstance(tar, OSError):
            raise tar
        if member >= len(tar):
            raise OSError(
                f"{tar.path}: sample {member} missing ({tar.error or 'fewer samples than its manifest lists'})"
            )
        return tar.read(member)

    def close(self) -> None:
        for tar in self._open.values():
            if isinstance(tar, TarSamples):
                tar.close()
        self._open.clear()


class PlannedStream(IterableDataset):
    """Training batches of one rank, following the epoch plan of a ``MixIndex``.

    The rank's batch ``j`` holds the ``batch_size`` planned samples at row ``j`` of the plan
    (samples that cannot be used are skipped and counted in ``batch["skipped"]``, so every
    rank still yields exactly ``len(self)`` batches). Worker ``w`` of ``W`` produces batches
    ``start + w, start + w + W, ...``; the DataLoader's round robin over workers therefore
    hands them out in plan order whatever ``W`` is, and resuming only needs ``start``.

    Each batch carries ``position = {"epoch", "index"}`` so the trainer side can record what
    was consumed.
    """

    def __init__(
        self,
        index: Any,
        encode: Callable[[dict], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        group_window: int = 0,
        image_tokens: int = 0,
        option: str = "data.train",
    ) -> None:
        super().__init__()
        self.index = index
        self.encode = encode
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.group_window = group_window
        self.image_tokens = image_tokens
        self.num_batches = index.batches_per_rank(batch_size, world_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{option}: {index.epoch_size()} samples per epoch cannot give each of {world_size} rank(s) one "
                f"batch of {batch_size}; lower data.batch_size or add data"
            )
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int) -> Any:
        """``[len(self), batch_size]`` global sample ids of this rank's batches in ``epoch``."""
        return self.index.rank_plan(
            epoch,
            self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            group_window=self.group_window,
            image_tokens=self.image_tokens,
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan(self.epoch)
        readers = _Readers(self.index.urls)
        try:
            for j in range(self.start + worker, self.num_batches, num_workers):
                yield self._batch(plan[j], j, readers)
        finally:
            readers.close()

    def _batch(self, gids: Any, j: int, readers: _Readers) -> dict:
        skipped: Counter[str] = Counter()
        notes: list[tuple[str, str]] = []
        samples = []
        for gid, shard in zip(gids.tolist(), self.index.shard_of(gids).tolist()):
            try:
                raw = readers.read(shard, gid - int(self.index.offsets[shard]))
            except OSError as err:
                skipped["shard_read"] += 1
                notes.append(("shard_read", str(err)))
                continue
            try:
                samples.append(self.encode(raw))
            except SampleError as err:
                skipped[err.reason] += 1
                notes.append((err.reason, f"{self.index.urls[shard]}: {err}"))
        out = self.collate(samples)
        out["skipped"] = dict(skipped)
        out["skip_notes"] = notes
        out["position"] = {"epoch": self.epoch, "index": j}
        return out


class _Tracked:
    """Iterator that records, in its loader, the position after each batch it hands out."""

    def __init__(self, it: Iterator[dict], loader: "ResumableLoader") -> None:
        self._it, self._loader = it, loader

    def __iter__(self) -> "_Tracked":
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        pos = batch.get("position") if isinstance(batch, dict) else None
        if pos is not None:
            self._loader.position = (pos["epoch"], pos["index"] + 1)
        self._loader.resume = None  # the resumed epoch is under way; later epochs start at 0
        return batch


class ResumableLoader(DataLoader):
    """The training DataLoader: sets the stream's epoch and start batch at each ``iter()``.

    ``epoch_fn`` gives the epoch (the Trainer's ``current_epoch``); without it (or when it
    returns None) epochs are counted here. ``resume = (epoch, batches)`` makes that epoch
    start after ``batches`` batches (a finished epoch: the next one from its first batch).
    ``position`` is (epoch, batches handed out so far).
    ``state_dict``/``load_state_dict`` delegate to ``state`` (the DataModule), so Lightning's
    loop checkpointing and the DataModule's agree.

    After a resume the data epoch follows the Trainer's at a fixed offset set by the resume,
    not the Trainer's number itself: Lightning restored from a checkpoint written at the last
    step of an epoch (``every_n_train_steps`` landing there) counts one epoch more than it
    trained (it runs the next epoch number empty), and the data must not skip that epoch.
    """

    def __init__(
        self,
        stream: PlannedStream,
        num_workers: int,
        epoch_fn: Callable[[], int | None] | None = None,
        state: Any = None,
    ) -> None:
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            generator=_own_generator(),
            worker_init_fn=_leave_sigterm_to_main,
        )
        self.epoch_fn = epoch_fn
        self.state = state
        self.resume: tuple[int, int] | None = None
        self.position: tuple[int, int] | None = None
        self._next_epoch = 0
        self._offset = 0  # data epoch - Trainer epoch

    def __iter__(self):
        trainer_epoch = self.epoch_fn() if self.epoch_fn is not None else None
        stream = self.dataset
        resume = self.resume
        if resume is not None and resume[1] >= len(stream):
            resume = (resume[0] + 1, 0)  # that epoch was finished: go on with the next one
        if trainer_epoch is None:
            epoch, start = resume if resume is not None else (self._next_epoch, 0)
            self.resume = None  # counted epochs: a resume applies to this iter() only
        elif resume is not None:
            # Lightning may call iter() twice before the first batch (once only to look); the
            # resume stays, and fixes the offset, until a batch of it is handed out (see _Tracked).
            epoch, start = resume
            self._offset = epoch - trainer_epoch
        else:
            epoch, start = trainer_epoch + self._offset, 0
        stream.epoch, stream.start = epoch, start
        self._next_epoch = epoch + 1
        self.position = (epoch, stream.start)
        return _Tracked(super().__iter__(), self)

    def state_dict(self) -> dict:
        return self.state.state_dict() if self.state is not None else {"epoch": 0, "batches": 0}

    def load_state_dict(self, state: dict) -> None:
        if self.state is not None:
            self.state.load_state_dict(state)
        else:
            self.resume = (int(state["epoch"]), int(state["batches"]))
