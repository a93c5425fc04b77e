"""The one way lmm writes WebDataset tar shards (the shapes worlds and the LLaVA converters).

Members are written in sorted order with fixed metadata (mtime, mode, no owner), so the same
samples always give byte-identical shards, and a shard is written under a temporary name and
renamed when complete, so a crash never leaves a half-written shard under its final name.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

# An int: a float mtime makes tarfile write a 1 KiB PAX record before every member.
TAR_MTIME = 0


def shard_name(k: int) -> str:
    """``shard-000007.tar`` for k = 7."""
    return f"shard-{k:06d}.tar"


def write_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> int:
    """Append ``{key}.{ext}`` for every member, extensions in sorted order; returns the bytes written."""
    total = 0
    for ext in sorted(members):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        tar.addfile(info, io.BytesIO(data))
        total += len(data)
    return total


class ShardWriter:
    """Writes samples into ``OUT/{split}/shard-{k:06d}.tar`` files of at most ``samples_per_shard``
    samples each; ``shards`` lists the finished and current shards relative to ``OUT``."""

    def __init__(self, out_dir: str | os.PathLike, split: str, samples_per_shard: int) -> None:
        self.out_dir, self.split, self.limit = Path(out_dir), split, samples_per_shard
        self.shards: list[str] = []
        self.num_samples = 0
        self._tar: Any = None
        self._path: Path | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample (e.g. ``{"json": ..., "png": ...}``), starting a new shard when the
        current one is full."""
        if self._tar is None or self.num_samples % self.limit == 0:
            self._finish_current()
            rel = f"{self.split}/{shard_name(len(self.shards))}"
            self._path = self.out_dir / rel
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._tar = tarfile.open(self._tmp(self._path), "w", format=tarfile.GNU_FORMAT)
            self.shards.append(rel)
        write_sample(self._tar, key, members)
        self.num_samples += 1

    @staticmethod
    def _tmp(path: Path) -> Path:
        return path.with_name(path.name + ".tmp")

    def _finish_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp(self._path), self._path)
            self._tar = self._path = None

    def close(self) -> None:
        """Finish the last shard."""
        self._finish_current()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
