"""Video as LLaVA-OneVision shows it: frames sampled uniformly up to a cap, each frame at the
tower's input size, each frame's token grid pooled by bilinear interpolation, and one learned
newline after the whole clip (OneVision's ``mm_newline_position: one_token``).

In shards a video is one sample whose json has ``"modality": "video"``; its image members
(``KEY.000.png``, ``KEY.001.png``, ... in member-name order) are the frames, and its
conversation holds a single ``<image>`` placeholder for the whole clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmm.errors import ConfigError


@dataclass
class VideoConfig:
    """How video samples become tokens.

    Args:
        max_frames: Frames kept per video; longer clips are sampled uniformly
            (``linspace(0, frames - 1, max_frames)``, rounded down; OneVision: 32).
        pool: Each frame's ``unit x unit`` token grid is resized bilinearly to
            ``ceil(unit / pool)`` per side (OneVision: 2, so SigLIP-384's 27x27 -> 14x14 = 196).
    """

    max_frames: int = 32
    pool: int = 2

    def __post_init__(self) -> None:
        if self.max_frames < 1:
            raise ConfigError(f"model.vision.video.max_frames must be >= 1, got {self.max_frames}")
        if self.pool < 1:
            raise ConfigError(f"model.vision.video.pool must be >= 1, got {self.pool}")


def frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Which of ``num_frames`` frames a clip keeps (all of them when within the cap)."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, max_frames).astype(np.int64).tolist()


def pooled_side(unit: int, pool: int) -> int:
    """Side of a frame's token grid after pooling."""
    return math.ceil(unit / pool)


def video_tokens(frames: int, unit: int, pool: int) -> int:
    """Tokens of a clip: every frame's pooled grid, then one newline."""
    return frames * pooled_side(unit, pool) ** 2 + 1
