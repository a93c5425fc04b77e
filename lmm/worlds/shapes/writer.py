"""Writes a whole world to shards (in parallel, resumable, with a manifest) and reads back whether it is complete."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from lmm.data.tar_writer import ShardWriter
from lmm.worlds.shapes.config import FORMAT_VERSION, WorldConfig, WorldObject
from lmm.worlds.shapes.pope import compute_stats
from lmm.worlds.shapes.samples import (
    CAPTION_SPLIT,
    eval_image_samples,
    json_bytes,
    train_image_samples,
)

CHAIR_SYNONYMS = "chair_synonyms.txt"
"""The synonym table of ``test/caption`` (one shape kind per line), next to its shards."""


def _imap(fn: Callable[[int], Any], n: int, pool: Any, workers: int) -> Iterator[Any]:
    """Ordered map over ``range(n)``, in a pool when one is given (order stays deterministic)."""
    if pool is None:
        return map(fn, range(n))
    # Chunks amortise IPC; capped so progress stays smooth and workers stay balanced.
    return pool.imap(fn, range(n), chunksize=max(1, min(64, n // (4 * workers))))


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(manifest: dict[str, Any] | None, cfg: WorldConfig, out_dir: Path) -> bool:
    if (
        not manifest
        or manifest.get("format_version") != FORMAT_VERSION
        or manifest.get("config") != cfg.to_dict()
    ):
        return False
    return all(
        (out_dir / s).is_file() for split in manifest["splits"].values() for s in split["shards"]
    )


OUTPUT_SPLITS: tuple[str, ...] = (
    "pretrain",
    "finetune",
    "val",
    "test/pope_random",
    "test/pope_popular",
    "test/pope_adversarial",
    "test/short_answer",
    CAPTION_SPLIT,
)


def write_world(
    out_dir: str | os.PathLike[str],
    cfg: WorldConfig | None = None,
    *,
    overwrite: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the whole world under ``out_dir`` and return its manifest.

    Layout: ``pretrain/``, ``finetune/``, ``val/``, ``test/pope_{random,popular,adversarial}/``,
    ``test/short_answer/`` and ``test/caption/`` (with ``chair_synonyms.txt``: the shape kinds,
    CHAIR's synonym table), each holding ``shard-XXXXXX.tar`` files, plus ``manifest.json``
    (written last, so it marks a complete world).  If a manifest with
    the same config already exists the world is reused unless ``overwrite``.
    ``num_workers`` (default: all cores) only changes speed, never the output.
    """
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    old = _load_manifest(manifest_path)
    if not overwrite and _is_complete(old, cfg, out):
        assert old is not None
        return old

    # Remove what a previous (different or partial) run left, so no stale shard survives.
    manifest_path.unlink(missing_ok=True)
    for split in OUTPUT_SPLITS:
        for stale in sorted((out / split).glob("shard-*.tar")):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)

    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    total = cfg.train_images + cfg.val_images + cfg.test_images
    pool = multiprocessing.Pool(workers) if workers > 1 and total >= 64 else None
    bar = _progress_bar(total, progress)
    try:
        writers = {s: ShardWriter(out, s, cfg.samples_per_shard) for s in ("pretrain", "finetune")}
        train_objects: list[list[WorldObject]] = []
        for objects, samples in _imap(
            partial(train_image_samples, cfg), cfg.train_images, pool, workers
        ):
            train_objects.append(objects)
            for split, key, png, js in samples:
                writers[split].write(key, {"png": png, "json": js})
            bar.update(1)
        stats = compute_stats(cfg, train_objects)

        images = {"pretrain": cfg.train_images, "finetune": cfg.train_images}
        for split, n in (("val", cfg.val_images), ("test", cfg.test_images)):
            for per_image in _imap(
                partial(eval_image_samples, cfg, split, stats), n, pool, workers
            ):
                for out_split, key, png, js in per_image:
                    if out_split not in writers:
                        writers[out_split] = ShardWriter(out, out_split, cfg.eval_samples_per_shard)
                        images[out_split] = (
                            min(n, cfg.caption_test_images) if out_split == CAPTION_SPLIT else n
                        )
                    w = writers[out_split]
                    # question_id = running index within the output split (known only here).
                    record = json.loads(js)
                    record["question_id"] = w.num_samples
                    w.write(key, {"png": png, "json": json_bytes(record)})
                bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    for w in writers.values():
        w.close()
    if CAPTION_SPLIT in writers:
        (out / CAPTION_SPLIT / CHAIR_SYNONYMS).write_text(
            "\n".join(cfg.shapes) + "\n", encoding="utf-8"
        )

    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "splits": {
            name: {"shards": w.shards, "num_samples": w.num_samples, "num_images": images[name]}
            for name, w in writers.items()
        },
        "stats": stats,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="shapes world", unit="img")
