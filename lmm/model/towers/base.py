"""Vision towers behind one interface.

Every tower returns features ``[B, num_tokens, hidden_size]``, owns its ``image_spec`` (input
size, normalisation, aspect handling: what the data side must do to an image), and lists its
``blocks()`` in forward order so ``partial`` freezing works the same for every kind.

A tower kind is a class (or factory) plus an exact-name entry in ``VISION_TOWERS``
(``lmm.model.towers``); the YAML
names the entry (``model.vision.kind``). Kinds: ``hf`` (transformers CLIP / SigLIP / DINOv2,
in ``towers/hf.py``), ``open_clip`` (open_clip ViTs, ``towers/open_clip.py``), ``timm`` (timm
ViTs and CNNs, ``towers/timm.py``), ``fused`` (several towers on one image, ``towers/fused.py``).

Everything after the selected ``feature_layer`` (later blocks, final norm, pooling head,
projection) is removed at load time: it cannot influence the features, costs compute, and
would count as trainable parameters that never receive a gradient.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Literal, Optional, TypeVar

import torch
from torch import nn

from lmm.errors import ConfigError, MissingWeightsError
from lmm.model.towers.fused_config import FusedConfig
from lmm.visual.anyres import AnyResConfig
from lmm.visual.image_spec import FillRounding, ImageSpec, Preprocess
from lmm.visual.video import VideoConfig

T = TypeVar("T")

SELECT_MODES: tuple[str, ...] = ("auto", "patch", "full")


@dataclass
class VisionConfig:
    """Which vision tower to build and how its features and images are taken.

    Args:
        kind: Tower implementation (registry ``VISION_TOWERS``): ``hf`` (transformers CLIP /
            SigLIP / DINOv2), ``open_clip`` (an open_clip ViT), ``timm`` (a timm ViT or CNN),
            ``fused`` (the towers of ``fused`` on the same image).
        name_or_path: Where the pretrained tower is. ``hf``: hub name or local directory
            (``openai/clip-vit-large-patch14-336``, ``google/siglip-so400m-patch14-384``,
            ``facebook/dinov2-large``).
            ``open_clip``: ``hf-hub:ORG/REPO`` or a local directory holding
            ``open_clip_config.json`` and the weights. ``timm``: a timm name with a pretrained
            tag (``vit_base_patch16_clip_224.openai``), ``hf-hub:timm/NAME``, or a local
            directory holding timm's ``config.json`` and ``model.safetensors``.
        feature_layer: Which block's output feeds the connector: -1 = last block, -2 = second
            to last (LLaVA), k >= 1 = block k. For a CNN a block is a stage, and -1 is its final
            feature map. None: the tower's default (-2 for ViTs, -1 for CNNs).
        select: Which tokens of that output: ``auto`` keeps the patch tokens only (drops CLIP's
            and open_clip's CLS, DINOv2's CLS and registers and timm's prefix/register tokens,
            keeps every SigLIP patch: SigLIP has no CLS); ``patch`` always drops the first token (LLaVA's ``patch``; on
            SigLIP this loses a real patch); ``full`` keeps every token.
        image_preprocess: How a non-square image becomes the tower's square input:
            ``square`` (exactly the tower's own image processor: SigLIP squashes, CLIP resizes
            the shortest edge and centre-crops; LLaVA's and TinyLLaVA's ``square``), ``pad``
            (pad to a square with the mean colour, then resize; LLaVA-1.5's finetuning),
            ``crop`` (shortest edge, centre crop, for any tower), ``letterbox``
            (scale to fit keeping the aspect ratio, pad with the mean colour) or ``resize``
            (squash). With ``anyres`` it shapes the base views and video frames; the crops
            keep the aspect ratio.
        fill_rounding: The mean colour of padding (and of transparent pixels) in 8 bits:
            ``floor`` = ``int(mean * 255)`` as LLaVA / TinyLLaVA / LLaVA-NeXT / Prismatic (CLIP
            (122, 116, 104), SigLIP (127, 127, 127)); ``nearest`` rounds (CLIP (123, 117, 104),
            SigLIP 128: normalises closer to zero; lmm's choice before the reference recipes).
        image_size: Side of the square input in pixels. None: the tower's own (``hf``: the
            config's ``image_size``, for DINOv2 its processor's crop size, 224 for
            ``facebook/dinov2-*`` whose config says 518; ``timm``: the pretrained input size).
            Another size interpolates the position embeddings: ``hf`` on every forward, bicubic
            as transformers does (CLIP/SigLIP through ``interpolate_pos_encoding``); ``timm``
            ViTs once at load (``create_model(img_size=...)``: bicubic, antialiased). The side
            must be a multiple of the patch size to use every pixel. Not for ``open_clip``.
        anyres: AnyRes views of a sample's single image (LLaVA-NeXT / OneVision): a base view
            plus a grid of crops, stitched, unpadded, budgeted, a newline per row (fields:
            ``--model.vision.anyres.help AnyResConfig``). None: one view per image. The
            tokens per image then depend on its size (``lmm.visual.layout``).
        video: Video samples (json ``"modality": "video"``, frames as image members): frame
            cap and per-frame pooling (``--model.vision.video.help VideoConfig``). None: video
            samples are skipped as malformed.
        fused: ``kind: fused`` only: the towers and how their features are joined (fields:
            ``--model.vision.fused.help FusedConfig``).
    """

    kind: str = "hf"
    name_or_path: str = "google/siglip-so400m-patch14-384"
    feature_layer: Optional[int] = None
    select: Literal["auto", "patch", "full"] = "auto"
    image_preprocess: Preprocess = "pad"
    fill_rounding: FillRounding = "floor"
    image_size: Optional[int] = None
    anyres: Optional[AnyResConfig] = None
    video: Optional[VideoConfig] = None
    fused: Optional[FusedConfig] = None

    def __post_init__(self) -> None:
        # Checkpoints (hyperparameters, lmm.json) store the nested settings as plain dicts.
        if isinstance(self.anyres, dict):
            self.anyres = AnyResConfig(**self.anyres)
        if isinstance(self.video, dict):
            self.video = VideoConfig(**self.video)
        if isinstance(self.fused, dict):
            self.fused = FusedConfig(**self.fused)


class VisionTower(nn.Module, ABC):
    """Interface every tower implements.

    Attributes:
        image_spec: What an image must look like for this tower (the data side applies it).
        hidden_size: Feature width ``D``.
        num_tokens: Tokens per image ``N`` (known before the model runs).
        token_groups: How many towers' tokens alternate in the output (token ``i`` comes from
            tower ``i % token_groups``): 1, except for a fused tower joined by ``interleave``.
    """

    image_spec: ImageSpec
    hidden_size: int
    num_tokens: int
    token_groups: int = 1

    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The kept blocks (transformer layers, or CNN stages) in forward order.

        ``partial`` freezing from block k freezes everything registered before the blocks
        (patch embedding / stem) and blocks ``< k``; nothing of the tower follows the blocks.
        """

    def sub_towers(self) -> list["VisionTower"]:
        """The towers freeze policies apply to one by one, each with its own ``blocks()``:
        the tower itself, or a fused tower's towers."""
        return [self]

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` normalised pixels (``C = image_spec.channels``: 3, or 3 per tower
        of a fused tower) -> ``[B, num_tokens, hidden_size]``."""


# -- helpers shared by the tower kinds ------------------------------------------------------


def resolve_feature_layer(feature_layer: Optional[int], n_blocks: int, default: int) -> int:
    """``feature_layer`` (None = ``default``) -> how many blocks to keep, in ``[1, n_blocks]``.

    Counting follows transformers' ``hidden_states``: index 0 is the embedding output (no
    block), k the output of block k, -1 the last block.
    """
    layer = default if feature_layer is None else feature_layer
    if not -n_blocks <= layer <= n_blocks or layer == 0:
        what = "the embedding output (no block)" if layer in (0, -n_blocks - 1) else "no block"
        raise ConfigError(
            f"model.vision.feature_layer={layer} selects {what} of a {n_blocks}-block tower; "
            f"use a value in [-{n_blocks}, -1] or [1, {n_blocks}]"
        )
    return layer if layer > 0 else n_blocks + 1 + layer


def tokens_to_skip(select: str, prefix_tokens: int, *, kind: str) -> int:
    """How many leading tokens ``select`` drops from a sequence with ``prefix_tokens`` non-patch
    tokens (CLS, registers) in front of the patches."""
    if select == "auto":
        return prefix_tokens
    if select == "patch":
        return 1
    if select == "full":
        return 0
    raise ConfigError(
        f"model.vision.select: unknown token strategy {select!r} for kind {kind!r}; allowed: {', '.join(SELECT_MODES)}"
    )


def looks_local(name_or_path: str) -> bool:
    """A filesystem path rather than a hub name (``google/siglip-...`` is a hub id, while
    ``artifacts/models/vision`` whose first folder exists here is a path)."""
    if name_or_path.startswith(("/", ".", "~", "local-dir:")):
        return True
    return "/" in name_or_path and os.path.isdir(name_or_path.split("/")[0])


def library_source(name_or_path: str) -> str:
    """The model name timm and open_clip ``create_model`` take for a config value: a local
    path becomes ``local-dir:PATH``, a hub repo id ``ORG/NAME`` becomes ``hf-hub:ORG/NAME``;
    ``hf-hub:``/``local-dir:`` names and bare library names pass through."""
    if name_or_path.startswith(("hf-hub:", "local-dir:")):
        return name_or_path
    if os.path.isdir(name_or_path) or looks_local(name_or_path):
        return f"local-dir:{os.path.expanduser(name_or_path)}"
    if "/" in name_or_path:
        return f"hf-hub:{name_or_path}"
    return name_or_path


def load_or_explain(
    load: Callable[[], T],
    name_or_path: str,
    what: str,
    expects: str,
    hub_repo: Optional[str] = None,
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError, ValueError),
) -> T:
    """Run ``load()``; a failure becomes a ``MissingWeightsError`` that names the path and says
    how to fix ``model.vision.name_or_path`` (the offline case included).

    Args:
        load: The tower library's own loading call (the same for hub names and local dirs).
        name_or_path: What the config said.
        what: e.g. "timm vision tower".
        expects: The files a local directory must hold, e.g. "config.json and model.safetensors".
        hub_repo: The hub repository behind a hub name (for the download hint).
    """
    try:
        return load()
    except errors as err:
        path = name_or_path.removeprefix("local-dir:")
        if os.path.isdir(path):
            reason = (
                f"the directory exists but does not hold a loadable {what} (it needs {expects})"
            )
            fix = (
                f"Put those files in {path!r}, or set model.vision.name_or_path (and model.vision.kind) "
                "to a directory that holds them"
            )
        elif looks_local(name_or_path):
            reason = "no such directory"
            fix = f"Set model.vision.name_or_path to a directory holding {expects}"
        else:
            repo = hub_repo or name_or_path.removeprefix("hf-hub:")
            reason = "it is not a local directory and could not be fetched from the hub (offline?)"
            fix = (
                f"Download it where you have network (e.g. `hf download {repo} --local-dir DIR`) "
                "and set model.vision.name_or_path: DIR"
            )
        raise MissingWeightsError(
            f"cannot load {what} weights from {name_or_path!r}: {reason}. {fix}. ({type(err).__name__}: {err})"
        ) from err


def has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None
