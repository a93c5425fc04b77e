"""``square`` and ``pad`` give exactly the pixels the reference code feeds its towers.

LLaVA (``llava/train/train.py``, ``LazySupervisedDataset.__getitem__``), TinyLLaVA_Factory
(``tinyllava/data/image_preprocess.py``, ``ImagePreprocess.__call__``) and LLaVA-NeXT run the
tower's own transformers image processor, of the PIL kind of their time, on the image
(``square``), or on the image padded to a square first (``pad``: ``expand2square``). Here the
processors are transformers' PIL-backend classes (``backend="pil"``: ``CLIPImageProcessorPil``,
``SiglipImageProcessorPil``; DINOv2's ``BitImageProcessorPil``, as TinyLLaVA's DINOv2 tower
uses it) loaded from the hub repositories' own ``preprocessor_config.json``,
written out below; lmm reads the same file. The torchvision backend (transformers 5's default)
resizes with ``torchvision``'s antialiased bicubic, which is not PIL's: its pixels differ from
the reference by up to 2 of 255 levels (checked below). The processor lmm writes into checkpoint
directories reproduces lmm's pixels the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lmm.data.image import ImageTransform
from lmm.standins.photo import photo
from lmm.standins.vision import HUB_TOWERS
from lmm.visual.image_spec import ImageSpec

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# preprocessor_config.json of the hub repositories, as published.
PREPROCESSOR_CONFIGS = {
    "openai/clip-vit-large-patch14-336": {
        "crop_size": 336,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_MEAN,
        "image_std": OPENAI_STD,
        "resample": 3,
        "size": 336,
    },
    "openai/clip-vit-large-patch14": {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_MEAN,
        "image_std": OPENAI_STD,
        "resample": 3,
        "size": 224,
    },
    "google/siglip-so400m-patch14-384": {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384},
    },
    "facebook/dinov2-large": {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor",
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 256},
    },
}
# (vision model_type, input size) per repository.
TOWERS = {
    "openai/clip-vit-large-patch14-336": ("clip_vision_model", 336),
    "openai/clip-vit-large-patch14": ("clip_vision_model", 224),
    "google/siglip-so400m-patch14-384": ("siglip_vision_model", 384),
    "facebook/dinov2-large": ("dinov2", 224),
}
# LLaVA pads for CLIP; a padded square through CLIP's or SigLIP's processor is a plain resize.
PADDED = [
    "openai/clip-vit-large-patch14-336",
    "openai/clip-vit-large-patch14",
    "google/siglip-so400m-patch14-384",
]
# Landscape, portrait, panorama, odd sizes, exact fits, one pixel over, upscaling, a big photo.
SIZES = [
    (640, 480),
    (480, 640),
    (1000, 300),
    (333, 517),
    (336, 336),
    (385, 384),
    (200, 150),
    (17, 9),
]


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """LLaVA's ``expand2square`` (haotian-liu/LLaVA ``llava/train/train.py``, inside
    ``LazySupervisedDataset.__getitem__``; the same in TinyLLaVA_Factory's
    ``ImagePreprocess.expand2square`` and LLaVA-NeXT's ``llava/mm_utils.py``): a square of side
    ``max(w, h)`` in ``background_color``, the image pasted at ``(0, (w - h) // 2)`` when wide,
    ``((h - w) // 2, 0)`` when tall."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(
        pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
    )
    return result


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """repo -> (directory holding its preprocessor_config.json, PIL-backend processor)."""
    from transformers import AutoImageProcessor

    out = {}
    for repo, cfg in PREPROCESSOR_CONFIGS.items():
        d = tmp_path_factory.mktemp(repo.replace("/", "_"))
        (d / "preprocessor_config.json").write_text(json.dumps(cfg))
        out[repo] = (str(d), AutoImageProcessor.from_pretrained(str(d), backend="pil"))
    return out


def _ours(towers, repo: str, preprocess: str) -> ImageTransform:
    model_type, size = TOWERS[repo]
    return ImageTransform(ImageSpec.from_pretrained(towers[repo][0], model_type, size, preprocess))


def _theirs(processor, img: Image.Image) -> torch.Tensor:
    return processor(img, return_tensors="pt")["pixel_values"][0]


def test_the_standins_carry_the_same_preprocessor_configs():
    assert {repo: cfg for repo, (_, _, _, cfg) in HUB_TOWERS.items()} == PREPROCESSOR_CONFIGS


def test_the_reference_processors_are_the_pil_kind(towers):
    names = {repo: type(p).__name__ for repo, (_, p) in towers.items()}
    assert names["openai/clip-vit-large-patch14-336"] == "CLIPImageProcessorPil"
    assert names["google/siglip-so400m-patch14-384"] == "SiglipImageProcessorPil"
    assert names["facebook/dinov2-large"] == "BitImageProcessorPil"


@pytest.mark.parametrize("repo", list(PREPROCESSOR_CONFIGS))
def test_square_is_the_towers_own_processor_exactly(towers, repo):
    ours = _ours(towers, repo, "square")
    # CLIP: shortest edge + centre crop; SigLIP: squash; DINOv2: shortest edge 256, centre 224.
    assert ours.spec.mode == ("resize" if "siglip" in repo else "crop")
    for i, (w, h) in enumerate(SIZES):
        img = photo(w, h, seed=i)
        assert torch.equal(ours(img), _theirs(towers[repo][1], img)), (repo, w, h)


@pytest.mark.parametrize("repo", PADDED)
def test_pad_is_expand2square_then_the_processor_exactly(towers, repo):
    processor = towers[repo][1]
    # The reference's background: tuple(int(x * 255) for x in processor.image_mean).
    background = tuple(int(x * 255) for x in processor.image_mean)
    assert background == ((122, 116, 104) if "clip" in repo else (127, 127, 127))
    ours = _ours(towers, repo, "pad")
    assert ours.spec.fill == background
    for i, (w, h) in enumerate(SIZES):
        img = photo(w, h, seed=10 + i)
        theirs = _theirs(processor, expand2square(img, background))
        assert torch.equal(ours(img), theirs), (repo, w, h)


def test_a_large_photo(towers):
    img = photo(2725, 1817, seed=3)
    for repo in ("openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384"):
        processor = towers[repo][1]
        assert torch.equal(_ours(towers, repo, "square")(img), _theirs(processor, img))
        background = tuple(int(x * 255) for x in processor.image_mean)
        padded = _theirs(processor, expand2square(img, background))
        assert torch.equal(_ours(towers, repo, "pad")(img), padded)


def test_the_torchvision_backend_is_close_but_not_the_reference(towers):
    """Why the PIL backend is the reference: transformers 5's default (torchvision) backend
    resizes differently; bounded here so a change in either shows up."""
    from transformers import AutoImageProcessor

    repo = "google/siglip-so400m-patch14-384"
    fast = AutoImageProcessor.from_pretrained(towers[repo][0], backend="torchvision")
    ours = _ours(towers, repo, "square")
    worst = 0.0
    for i, (w, h) in enumerate(SIZES):
        img = photo(w, h, seed=i)
        diff = (ours(img) - _theirs(fast, img)).abs().max().item() * 0.5 * 255  # 8-bit levels
        worst = max(worst, diff)
    assert 0.5 < worst <= 2.0 + 1e-3


@pytest.mark.parametrize(
    "repo", ["openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384"]
)
@pytest.mark.parametrize("mode", ["square", "pad", "crop", "resize"])
def test_checkpoint_directories_save_a_processor_that_prepares_images_the_same(
    towers, repo, mode, tmp_path
):
    """``lmm.checkpoints.directory.image_processor_for`` (what checkpoint directories and HF
    exports carry) gives lmm's pixels under transformers' PIL backend, and reads back as the
    same geometry."""
    from transformers import AutoImageProcessor

    from lmm.checkpoints.directory import image_processor_for

    ours = _ours(towers, repo, mode)
    image_processor_for(ours.spec).save_pretrained(tmp_path)
    saved = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    for i, (w, h) in enumerate(SIZES[:4]):
        img = photo(w, h, seed=20 + i)
        assert torch.equal(_theirs(saved, img), ours(img)), (mode, w, h)
    model_type, size = TOWERS[repo]
    again = ImageSpec.from_pretrained(str(tmp_path), model_type, size, mode)
    assert again.mode == ours.spec.mode and (again.crop_from or size) == (
        ours.spec.crop_from or size
    )
