"""The shard-set manifest: written by the ``data_prep`` converters next to their shards, read
by the DataModule for epoch length, rank splitting and length grouping.

``manifest.json``::

    {
      "format": "lmm-shards", "version": 1,
      "num_samples": 665298, "num_images": 624255,
      "tokens": {"method": "tokenizer", "tokenizer": "lmsys/vicuna-7b-v1.5"},   # or {"method": "words", ...}
      "shards": [
        {"path": "shard-000000.tar", "num_samples": 1000,
         "tokens": [212, 87, ...],      # text tokens per sample, in tar order (no image tokens)
         "images": [1, 0, ...]},        # images per sample, in tar order
        ...
      ],
      "skipped": {"image_missing": 12, ...},
      "source": {...}                   # what was converted, with which options
    }

Token counts are text only: the DataModule adds ``images x tokens-per-image`` of the model in
use. Without ``--tokenizer`` they are estimated from words (:func:`estimate_tokens`), which is
enough to group similar lengths; exact lengths are measured when a sample is encoded.

Shards without such a manifest (e.g. the synthetic world's) are indexed by reading their tar
headers (sample and image counts) and, only for length grouping, their json members.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lmm.constants import IMAGE_TOKEN
from lmm.data.tarindex import TarSamples

log = logging.getLogger("lmm")

MANIFEST_NAME = "manifest.json"
FORMAT = "lmm-shards"
VERSION = 1
# English text through LLaMA/Vicuna-style BPE averages about 1.3 tokens per whitespace word.
TOKENS_PER_WORD = 1.3


def conversation_text(conversations: Any) -> str:
    """The words a conversation contributes (turn values, ``<image>`` markers removed)."""
    if not isinstance(conversations, list):
        return ""
    values = [t.get("value", "") for t in conversations if isinstance(t, dict)]
    return "\n".join(v.replace(IMAGE_TOKEN, " ") for v in values if isinstance(v, str))


def estimate_tokens(text: str) -> int:
    """Text tokens estimated from words (``ceil(1.3 x words)``); used without a tokenizer."""
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (a reader never sees half a file)."""
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The manifest at ``path`` if it is an lmm shard manifest, else None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    if data.get("version") != VERSION:
        raise ValueError(
            f"{path}: manifest version {data.get('version')!r}, this lmm reads version {VERSION}; "
            "re-run the converter"
        )
    return data


@dataclass
class ShardInfo:
    """What the DataModule knows about one shard before reading it."""

    url: str
    num_samples: int
    images: np.ndarray  # images per sample (tar order)
    tokens: Optional[np.ndarray] = None  # text tokens per sample (tar order), if known


def _from_manifest(url: str, entry: dict) -> ShardInfo:
    n = int(entry["num_samples"])
    images = np.asarray(entry.get("images", [1] * n), dtype=np.int32)
    tokens = entry.get("tokens")
    tokens = None if tokens is None else np.asarray(tokens, dtype=np.int32)
    if len(images) != n or (tokens is not None and len(tokens) != n):
        raise ValueError(
            f"{url}: manifest lists {n} samples but {len(images)} image counts / "
            f"{None if tokens is None else len(tokens)} token counts; re-run the converter"
        )
    return ShardInfo(url, n, images, tokens)


def scan_shard(url: str, need_tokens: bool) -> ShardInfo:
    """Index a shard that no manifest describes, from its tar headers (and json members)."""
    from lmm.data.image import (
        IMAGE_EXTENSIONS,  # here: converters import this module without torch
    )

    tar = TarSamples(url)
    images = np.asarray(
        [
            sum(e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS for e in tar.extensions(i))
            for i in range(len(tar))
        ],
        dtype=np.int32,
    )
    tokens = None
    if need_tokens:
        counts = []
        for i in range(len(tar)):
            try:
                meta = json.loads(tar.read(i).get("json", b"{}"))
                counts.append(estimate_tokens(conversation_text(meta.get("conversations"))))
            except (OSError, ValueError, AttributeError):
                counts.append(0)  # unreadable: the encoder skips it and counts why
        tokens = np.asarray(counts, dtype=np.int32)
    tar.close()
    return ShardInfo(url, len(tar), images, tokens)


def index_shards(urls: list[str], need_tokens: bool = False) -> list[ShardInfo]:
    """Per-shard counts: from ``manifest.json`` in the shard's folder when it lists the shard,
    otherwise by scanning the tar."""
    manifests: dict[str, dict[str, dict]] = {}
    out: list[ShardInfo] = []
    scanned = 0
    for url in urls:
        folder = os.path.dirname(os.path.abspath(url))
        if folder not in manifests:
            data = read_manifest(os.path.join(folder, MANIFEST_NAME))
            manifests[folder] = {s["path"]: s for s in data["shards"]} if data else {}
        entry = manifests[folder].get(os.path.basename(url))
        if entry is not None and (entry.get("tokens") is not None or not need_tokens):
            out.append(_from_manifest(url, entry))
        else:
            out.append(scan_shard(url, need_tokens))
            scanned += 1
    if scanned:
        log.info("indexed %d shard(s) without a manifest by reading their tar headers", scanned)
    return out
