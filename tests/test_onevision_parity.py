"""LLaVA-OneVision's image side against transformers' own OneVision processors.

- AnyRes crops: the tower inputs lmm builds for one image (base view + crops) equal
  ``LlavaOnevisionImageProcessorPil``'s exactly, padding included (black, as LLaVA-NeXT's
  ``llava/mm_utils.py::resize_and_pad_image``), on sizes where the float grid choice matters
  (2725x1817 at 336 px: a 4x6 grid, 25 views).
- Multi-image samples: each image padded to a square with ``int(mean * 255)`` and resized, as
  the same processor (and LLaVA-NeXT's ``train.py``, ``process_image(f, "pad")``) does.
- Token counts: what lmm's encoder expands ``<image>`` to equals what ``LlavaOnevisionProcessor``
  (a tiny Qwen2-style tokenizer, 729 tokens per view, ``anyres_max_9``) writes, for a single
  image, several images and a video.

The PIL backend is the reference (LLaVA-NeXT resizes with PIL); transformers' default
torchvision backend picks the same grid (checked) but resamples differently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmm.data.encode import Processor, SampleEncoder
from lmm.data.image import ImageTransform
from lmm.data.templates import get_template
from lmm.data.visuals import tiles
from lmm.standins.photo import photo
from lmm.visual.anyres import AnyResConfig
from lmm.visual.image_spec import ImageSpec
from lmm.visual.layout import Visual, VisualLayout
from lmm.visual.video import VideoConfig

OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OV = AnyResConfig()  # anyres_max_9, 1x1 ... 6x6
SIZES = [(2725, 1817), (1000, 300), (300, 1000), (820, 738), (652, 815), (384, 384), (97, 403)]


def _hf_image_processor(tile: int, norm, backend: str = "pil"):
    from transformers.models.llava_onevision import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionImageProcessorPil,
    )

    cls = LlavaOnevisionImageProcessorPil if backend == "pil" else LlavaOnevisionImageProcessor
    # image_grid_pinpoints are (height, width); lmm's candidates (rows, cols) in the same order.
    pins = [[r * tile, c * tile] for r, c in OV.candidates()]
    mean, std = norm
    return cls(
        size={"height": tile, "width": tile},
        image_grid_pinpoints=pins,
        image_mean=list(mean),
        image_std=list(std),
    )


def _lmm_views(img, tile: int, norm, kind: str = "single") -> torch.Tensor:
    # The base view is OneVision's squash of the whole image (``resize``).
    spec = ImageSpec(size=tile, mean=norm[0], std=norm[1], preprocess="resize")
    layout = VisualLayout(tile=tile, unit=tile // 14, anyres=OV)
    return tiles(Visual(kind, *img.size), [img], layout, ImageTransform(spec))


@pytest.mark.parametrize("tile,norm", [(384, HALF), (336, OPENAI)], ids=["siglip384", "clip336"])
def test_anyres_views_equal_transformers_exactly(tile, norm):
    processor = _hf_image_processor(tile, norm)
    for i, (w, h) in enumerate(SIZES):
        img = photo(w, h, seed=i)
        theirs = processor(img, return_tensors="pt")["pixel_values"][0]
        ours = _lmm_views(img, tile, norm)
        assert ours.shape == theirs.shape, (w, h, tuple(ours.shape), tuple(theirs.shape))
        assert torch.equal(ours, theirs), (tile, w, h)


def test_the_float_grid_choice_and_black_padding():
    """2725x1817 at 336 px: in floats 2725 * (2016 / 2725) truncates to 2015, so 5x6 keeps no
    more than 4x6 and wastes more; transformers (both backends) and lmm take 4x6: 1 + 24 views."""
    img = photo(2725, 1817, seed=1)
    ours = _lmm_views(img, 336, OPENAI)
    for backend in ("pil", "torchvision"):
        theirs = _hf_image_processor(336, OPENAI, backend)(img, return_tensors="pt")
        assert theirs["pixel_values"].shape[1] == ours.shape[0] == 25
    # The 4x6 canvas is 2016x1344; the image fills its width and ceil(1817 * 2016 / 2725) =
    # 1345 -> 1344 rows: no padding. 1000x300 in 1x3 (1152x384): 346 rows, 19 black above.
    wide = _lmm_views(photo(1000, 300, seed=2), 384, HALF)
    black = (torch.zeros(3) - 0.5) / 0.5
    assert wide.shape[0] == 4
    for crop in wide[1:]:
        assert torch.equal(crop[:, :19], black.view(3, 1, 1).expand(3, 19, 384))
        assert not torch.equal(crop[:, 19:20], black.view(3, 1, 1).expand(3, 1, 384))


def test_mean_crop_fill_is_the_named_alternative():
    spec = ImageSpec(size=384, mean=HALF[0], std=HALF[1], preprocess="resize")
    layout = VisualLayout(tile=384, unit=27, anyres=AnyResConfig(crop_fill="mean"))
    views = tiles(
        Visual("single", 1000, 300), [photo(1000, 300, seed=2)], layout, ImageTransform(spec)
    )
    grey = (127 / 255 - 0.5) / 0.5  # int(0.5 * 255) = 127: about zero after normalisation
    assert torch.allclose(views[1][:, :19], torch.full((3, 19, 384), grey))


def test_multi_image_views_are_padded_to_square_as_transformers():
    processor = _hf_image_processor(384, HALF)
    imgs = [photo(500, 300, seed=3), photo(280, 610, seed=4), photo(384, 384, seed=5)]
    theirs = processor([imgs], return_tensors="pt")["pixel_values"]  # one sample, three images
    assert theirs.shape == (3, 1, 3, 384, 384)
    for img, their in zip(imgs, theirs):
        assert torch.equal(_lmm_views(img, 384, HALF, kind="multi"), their), img.size
    # multi_image_preprocess=None keeps the base view's squash (lmm's choice before).
    spec = ImageSpec(size=384, mean=HALF[0], std=HALF[1], preprocess="resize")
    layout = VisualLayout(tile=384, unit=27, anyres=AnyResConfig(multi_image_preprocess=None))
    squashed = tiles(Visual("multi", 500, 300), [imgs[0]], layout, ImageTransform(spec))
    assert torch.equal(squashed[0], ImageTransform(spec)(imgs[0]))


# -- token counts against LlavaOnevisionProcessor ------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    from lmm.standins.llm import build_llm

    return str(build_llm("qwen2", tmp_path_factory.mktemp("ov_qwen2")))


@pytest.fixture(scope="module")
def hf_processor(qwen2_dir):
    from transformers import AutoTokenizer
    from transformers.models.llava_onevision import (
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = AutoTokenizer.from_pretrained(qwen2_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return LlavaOnevisionProcessor(
        image_processor=_hf_image_processor(384, HALF),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3),
        num_image_tokens=729,  # SigLIP so400m/14 at 384 px
        vision_feature_select_strategy="full",  # OneVision keeps every SigLIP token
        vision_aspect_ratio="anyres_max_9",
    )


@pytest.fixture(scope="module")
def encoder(qwen2_dir):
    from lmm.model.language import LanguageConfig, load_tokenizer

    tok = load_tokenizer(LanguageConfig(name_or_path=qwen2_dir))
    spec = ImageSpec(size=384, mean=HALF[0], std=HALF[1], preprocess="resize")
    layout = VisualLayout(tile=384, unit=27, anyres=OV, video=VideoConfig(max_frames=32, pool=2))
    proc = Processor(tok, spec, 729, tok.convert_tokens_to_ids("<image>"), layout)
    return SampleEncoder(proc, get_template("chatml"), max_length=40000)


def _count(ids, tokenizer, token: str) -> int:
    return int((ids == tokenizer.convert_tokens_to_ids(token)).sum())


def _lmm_count(encoder, question: str, images, modality: str = "image") -> int:
    meta = {
        "id": "s",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "Yes."}],
    }
    if modality == "video":
        meta["modality"] = "video"
    ids = encoder.encode_train(meta, images)["input_ids"]
    return _count(ids, encoder.processor.tokenizer, "<image>")


def test_single_image_counts(hf_processor, encoder):
    for i, (w, h) in enumerate(SIZES + [(1, 1), (4000, 90)]):
        img = photo(w, h, seed=i)
        out = hf_processor(text="<image>\nWhat is it?", images=[img], return_tensors="pt")
        assert _lmm_count(encoder, "<image>\nWhat is it?", [img]) == _count(
            out["input_ids"], hf_processor.tokenizer, "<image>"
        ), (w, h)


def test_multi_image_counts(hf_processor, encoder):
    imgs = [photo(500, 300, seed=1), photo(300, 700, seed=2), photo(2725, 1817, seed=3)]
    out = hf_processor(text="<image> <image> <image> Which?", images=[imgs], return_tensors="pt")
    theirs = _count(out["input_ids"], hf_processor.tokenizer, "<image>")
    assert theirs == 3 * (729 + 1)
    assert _lmm_count(encoder, "<image> <image> <image> Which?", imgs) == theirs


@pytest.mark.parametrize("frames", [1, 8, 32])
def test_video_counts(hf_processor, encoder, frames):
    clip = [photo(320, 240, seed=i) for i in range(frames)]
    out = hf_processor(
        text="<video>\nWhat happens?",
        videos=[np.stack([np.asarray(f) for f in clip])],
        return_tensors="pt",
    )
    theirs = _count(out["input_ids"], hf_processor.tokenizer, "<video>")
    assert theirs == frames * 14 * 14 + 1  # bilinear ceil(27 / 2) = 14 per side, one newline
    assert _lmm_count(encoder, "<image>\nWhat happens?", clip, modality="video") == theirs
