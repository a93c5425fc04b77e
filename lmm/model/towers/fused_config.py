"""Settings of a fused tower (``model.vision.kind: fused``): the towers it runs on one image and
how their patch features are joined."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

JOIN_MODES: tuple[str, ...] = ("concat", "interleave")


@dataclass
class SubTowerConfig:
    """One tower of a fused tower: the fields of ``model.vision`` that are per tower.

    The image handling (``image_preprocess``, ``anyres``, ``video``) is the fused tower's own:
    every tower sees the same pixels, each normalised its own way.

    Args:
        kind: Tower implementation: ``hf``, ``open_clip`` or ``timm`` (as ``model.vision.kind``).
        name_or_path: Where the pretrained tower is (as ``model.vision.name_or_path``).
        feature_layer: Which block's output is taken (as ``model.vision.feature_layer``; None:
            the tower's default, -2 for ViTs).
        select: Which tokens of that output (as ``model.vision.select``).
        image_size: Input side in pixels (as ``model.vision.image_size``; None: the tower's own).
            Every tower of a fused tower must take the same size.
    """

    kind: str = "hf"
    name_or_path: str = ""
    feature_layer: Optional[int] = None
    select: Literal["auto", "patch", "full"] = "auto"
    image_size: Optional[int] = None


@dataclass
class FusedConfig:
    """Two (or more) towers run on the same image, their patch features joined.

    Args:
        towers: The towers, in order (``[{kind: timm, name_or_path: ...}, {...}]``). The first
            one's image geometry (size, aspect handling) is every tower's; each tower keeps its
            own normalisation and padding colour.
        join: ``concat``: features side by side along channels, one token per patch (width =
            the sum of the towers' widths; Prismatic's DINO-SigLIP); a tower whose patch grid
            differs from the first's is resized to the first's grid (bilinear). ``interleave``:
            the towers' tokens alternate one by one, tower 0's patch 0, tower 1's patch 0, ...
            (``towers`` x N tokens, all towers of equal width and token count; TinyLLaVA's
            MoF, with connector ``mof_mlp`` giving each tower its own MLP).
    """

    towers: list[SubTowerConfig] = field(default_factory=list)
    join: Literal["concat", "interleave"] = "concat"

    def __post_init__(self) -> None:
        # Checkpoints (hyperparameters, lmm.json) store the towers as plain dicts.
        self.towers = [SubTowerConfig(**t) if isinstance(t, dict) else t for t in self.towers]
