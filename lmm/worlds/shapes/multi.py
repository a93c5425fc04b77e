"""Multi-image and video questions in the shapes world: LLaVA-OneVision's other two scenarios, tiny.

* **multi-image**: two images with 0-``max_circles`` circles each (different counts) among
  other shapes; "Which image has more circles?" -> ``first`` / ``second`` (chance 0.5).
* **video**: a clip of ``frames`` frames in which one square moves ``step`` px per frame, left,
  right, up or down, past an optional shape that stands still; "Which way did the square
  move?" -> ``left`` / ``right`` / ``up`` / ``down`` (chance 0.25).

Shards use lmm's multi-image layout: ``KEY.000.png``, ``KEY.001.png``, ... and ``KEY.json``
(LLaVA conversation schema, one ``<image>`` per image). A clip is marked ``"modality":
"video"`` and has one ``<image>`` for all its frames. Splits: ``train/`` and ``val/`` (the two
tasks alternating within every shard: the training mix interleaves whole shards, and batches of
one task only made the tiny model forget the other), ``test/multi_image/`` and ``test/video/``
(single questions with ``answer`` and ``category`` for the ``short_answer`` scorer). Everything is a pure function of
:class:`MultiWorldConfig`; shards are byte-identical across runs.

    python -m data_prep.shapes_multi --out artifacts/tiny_ov/data
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lmm.constants import IMAGE_TOKEN
from lmm.data.tar_writer import ShardWriter
from lmm.worlds.shapes.config import WorldConfig, WorldObject
from lmm.worlds.shapes.scene import image_rng, place_objects, png_bytes, render

FORMAT_VERSION = 1
MULTI_IMAGE_QUESTION = "Which image has more circles?"
VIDEO_QUESTION = "Which way did the square move?"
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
TASKS: tuple[str, ...] = ("multi_image", "video")


@dataclass(frozen=True)
class MultiWorldConfig:
    """Everything that determines the multi-image and video samples."""

    # The tiny pipeline's drawing (lmm.commands.tiny.TINY_WORLD): the finetuned tiny model knows these shapes.
    world: WorldConfig = field(
        default_factory=lambda: WorldConfig(size_range=(0.7, 0.9), image_after_question=True)
    )
    """Drawing (image size, colours, background, shapes, object sizes), question placement and root seed."""
    train_samples: int = 6000
    """Training samples per task."""
    val_samples: int = 32
    """Validation samples per task."""
    test_samples: int = 300
    """Held-out test questions per task."""
    samples_per_shard: int = 1000
    """Maximum samples per shard."""
    max_circles: int = 3
    """Circles per image of a multi-image pair: two different counts in 0..max_circles."""
    max_distractors: int = 2
    """Other shapes per image of a pair: 0..max_distractors."""
    frames: int = 4
    """Frames per clip."""
    step: float = 10.0
    """Pixels the square moves between frames."""
    square_size: tuple[float, float] = (0.2, 0.3)
    """Size of the moving square (its box) as a fraction of the image side."""
    distractor_prob: float = 0.5
    """Chance that a clip also holds a shape that stands still."""

    def __post_init__(self) -> None:
        w = self.world
        if self.max_circles < 1 or self.max_circles + self.max_distractors > w.grid * w.grid:
            raise ValueError("need max_circles >= 1 and max_circles + max_distractors <= grid*grid")
        if "circle" not in w.shapes or "square" not in w.shapes:
            raise ValueError("the world's shapes must include circle and square")
        if self.frames < 2:
            raise ValueError("a clip needs at least 2 frames")
        travel = self.step * (self.frames - 1)
        if travel + self.square_size[1] * w.image_size > w.image_size:
            raise ValueError(
                f"a square of up to {self.square_size[1]} x {w.image_size} px cannot move {travel} px "
                "inside the image; lower step, frames or square_size"
            )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# --------------------------------------------------------------------------- the two tasks


def multi_image_pair(
    cfg: MultiWorldConfig, rng: np.random.Generator
) -> tuple[list[Image.Image], str, list[int]]:
    """Two images with different numbers of circles; returns (images, answer, circle counts)."""
    world = cfg.world
    others = [s for s in world.shapes if s != "circle"]
    counts = [int(c) for c in rng.choice(cfg.max_circles + 1, size=2, replace=False)]
    images = []
    for n in counts:
        kinds = ["circle"] * n + [
            others[int(rng.integers(len(others)))]
            for _ in range(int(rng.integers(cfg.max_distractors + 1)))
        ]
        images.append(render(world, place_objects(world, kinds, rng)))
    return images, ("first" if counts[0] > counts[1] else "second"), counts


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def moving_square_clip(
    cfg: MultiWorldConfig, rng: np.random.Generator
) -> tuple[list[Image.Image], str]:
    """A clip of a square moving in a straight line; returns (frames, direction)."""
    world = cfg.world
    side = world.image_size
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    dx, dy = DIRECTIONS[direction]
    size = float(rng.uniform(*cfg.square_size)) * side
    travel = cfg.step * (cfg.frames - 1)
    half = size / 2

    def start(d: int) -> float:  # along the motion, leave room for the travel
        lo, hi = half + (travel if d < 0 else 0.0), side - half - (travel if d > 0 else 0.0)
        return float(rng.uniform(lo, hi))

    x0, y0 = start(dx), start(dy)
    color = world.colors[int(rng.integers(len(world.colors)))]
    path = (
        min(x0, x0 + dx * travel) - half,
        min(y0, y0 + dy * travel) - half,
        max(x0, x0 + dx * travel) + half,
        max(y0, y0 + dy * travel) + half,
    )
    still: list[WorldObject] = []
    if rng.random() < cfg.distractor_prob:
        others = [s for s in world.shapes if s != "square"]
        kind = others[int(rng.integers(len(others)))]
        other_color = world.colors[int(rng.integers(len(world.colors)))]
        for _ in range(20):  # a free spot off the square's path, if there is one
            cx, cy = (float(v) for v in rng.uniform(half, side - half, size=2))
            if not _overlaps((cx - half, cy - half, cx + half, cy + half), path):
                still = [WorldObject(kind, other_color, -1, cx, cy, size)]
                break
    frames = []
    for t in range(cfg.frames):
        square = WorldObject(
            "square", color, -1, x0 + dx * cfg.step * t, y0 + dy * cfg.step * t, size
        )
        frames.append(render(world, [square, *still]))
    return frames, direction


def _human_turn(cfg: MultiWorldConfig, question: str, placeholders: int) -> str:
    images = "\n".join([IMAGE_TOKEN] * placeholders)
    return f"{question}\n{images}" if cfg.world.image_after_question else f"{images}\n{question}"


def make_sample(
    cfg: MultiWorldConfig, task: str, split: str, index: int
) -> tuple[str, dict[str, bytes]]:
    """``(key, tar members)`` of sample ``index`` of ``task`` in ``split`` (``train`` samples
    carry the answer as an assistant turn, eval samples as ``answer``)."""
    rng = image_rng(cfg.world, f"{task}-{split}", index)
    key = f"{task}-{split}-{index:06d}"
    record: dict[str, Any] = {"id": key}
    if task == "multi_image":
        images, answer, counts = multi_image_pair(cfg, rng)
        question, n_placeholders = MULTI_IMAGE_QUESTION, 2
        record["circles"] = counts
    elif task == "video":
        images, answer = moving_square_clip(cfg, rng)
        question, n_placeholders = VIDEO_QUESTION, 1
        record["modality"] = "video"
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    turns = [{"from": "human", "value": _human_turn(cfg, question, n_placeholders)}]
    if split == "train":
        turns.append({"from": "gpt", "value": answer})
    else:
        record.update(answer=answer, category=task)
    record["conversations"] = turns
    members = {f"{i:03d}.png": png_bytes(img) for i, img in enumerate(images)}
    members["json"] = json.dumps(record).encode("utf-8")
    return key, members


# --------------------------------------------------------------------------- shards


def _splits(cfg: MultiWorldConfig) -> dict[str, list[tuple[str, str, int]]]:
    """Output split -> (task, random-stream split, index) per sample, in writing order."""
    mixed = lambda split, n: [(TASKS[i % 2], split, i // 2) for i in range(2 * n)]  # noqa: E731
    out = {"train": mixed("train", cfg.train_samples), "val": mixed("val", cfg.val_samples)}
    out.update({f"test/{t}": [(t, "test", i) for i in range(cfg.test_samples)] for t in TASKS})
    return out


def write_multi_world(
    out_dir: str | os.PathLike[str], cfg: MultiWorldConfig | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write every split under ``out_dir`` (reused when ``manifest.json`` says the same config)
    and return the manifest."""
    cfg = cfg or MultiWorldConfig()
    out = Path(out_dir)
    path = out / "manifest.json"
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text(encoding="utf-8"))
        if (
            old.get("format_version") == FORMAT_VERSION
            and old.get("config") == cfg.to_dict()
            and all(
                (out / s).is_file() for split in old["splits"].values() for s in split["shards"]
            )
        ):
            return old
    path.unlink(missing_ok=True)
    splits = {}
    for name, items in _splits(cfg).items():
        for stale in sorted((out / name).glob("shard-*.tar")):
            stale.unlink()
        writer = ShardWriter(out, name, cfg.samples_per_shard)
        for qid, (task, split, index) in enumerate(items):
            key, members = make_sample(cfg, task, split, index)
            if split != "train":
                record = json.loads(members["json"])
                record["question_id"] = qid
                members["json"] = json.dumps(record).encode("utf-8")
            writer.write(key, members)
        writer.close()
        splits[name] = {"shards": writer.shards, "num_samples": writer.num_samples}
    manifest = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "splits": splits}
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
