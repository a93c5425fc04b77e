"""Per-dataset presets of the LLaVA-schema converter: where images live and known quirks.

Every dataset here shares one schema (``{"id", "image"?, "conversations": [{"from", "value"}]}``,
``image`` a path or a list of paths relative to an image folder), so a preset only says what
``--images`` should point at and how to find files the annotation names differently from the
disk. A preset is chosen by its exact name (``--preset``) or, with ``--preset auto``, by the
exact file name of ``--json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmm.registry import Registry


@dataclass(frozen=True)
class Preset:
    """How one public annotation file maps onto image folders.

    Attributes:
        name: Registry name (``--preset``).
        summary: One line for ``--help``.
        files: Public annotation file names this preset is for (``--preset auto`` matches them exactly).
        images: What ``--images`` must point at (the folder image paths are relative to).
        alt_extensions: ``(path prefix, extensions)``: when a file under the prefix is missing,
            the same name with these extensions is tried (OCR-VQA's download script keeps the
            source's .gif/.png while the annotations say .jpg).
        notes: Known quirks, printed by ``--list-presets``.
    """

    name: str
    summary: str
    files: tuple[str, ...] = ()
    images: str = "the folder the annotation's image paths are relative to"
    alt_extensions: tuple[tuple[str, tuple[str, ...]], ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


PRESETS: Registry[Preset] = Registry("preset")

_OCR_VQA = (("ocr_vqa/", (".gif", ".png", ".jpeg", ".GIF", ".PNG", ".JPG")),)
_TEXT_ONLY = "text-only ShareGPT conversations (no 'image' key) are kept and train without an image"
_LCS = (
    "LCS-558K images are referenced as llava/llava_pretrain/images/<dir>/<file>.jpg; if LLaVA-Pretrain lives "
    "elsewhere add --image-dir llava/llava_pretrain/images=/path/to/LLaVA-Pretrain/images"
)
_SAM = "SAM images are referenced as sam/images/sa_<n>.jpg: extract the SA-1B tars 000000-000050 flat into sam/images"

for preset in (
    Preset(
        name="llava",
        summary="any file in the LLaVA conversation schema (one image, a list of images, or none)",
        alt_extensions=_OCR_VQA,  # harmless elsewhere: only for missing files under ocr_vqa/
        notes=(
            _TEXT_ONLY,
            "OCR-VQA: the annotations name .jpg files; .gif/.png/.jpeg of the same name are found too",
        ),
    ),
    Preset(
        name="llava_pretrain",
        summary="LLaVA-1.5 pretraining captions (LAION/CC/SBU BLIP captions, 558K)",
        files=("blip_laion_cc_sbu_558k.json",),
        images="LLaVA-Pretrain/images (unzipped images.zip: 00000/ ... 00659/)",
    ),
    Preset(
        name="llava_mix665k",
        summary="LLaVA-1.5 instruction tuning mix (COCO, GQA, OCR-VQA, TextVQA, VG, text-only ShareGPT)",
        files=("llava_v1_5_mix665k.json",),
        images="the folder holding coco/train2017, gqa/images, ocr_vqa/images, textvqa/train_images, "
        "vg/VG_100K, vg/VG_100K_2",
        alt_extensions=_OCR_VQA,
        notes=(
            _TEXT_ONLY,
            "OCR-VQA: the annotations name .jpg files; .gif/.png/.jpeg of the same name are found too",
            "VG_100K_2 holds a few empty files upstream; they are reported as image_decode",
        ),
    ),
    Preset(
        name="sharegpt4v_pt",
        summary="ShareGPT4V-PT: 1.2M ShareCaptioner captions of COCO, LCS-558K and SAM images",
        files=("share-captioner_coco_lcs_sam_1246k_1107.json",),
        images="ShareGPT4V's data/ folder (coco/train2017, llava/llava_pretrain/images, sam/images)",
        notes=(_LCS, _SAM),
    ),
    Preset(
        name="sharegpt4v_cap100k",
        summary="ShareGPT4V: 100K GPT4-Vision captions "
        "(COCO, LCS, SAM, web-celebrity, web-landmark, wikiart, share_textvqa)",
        files=("sharegpt4v_instruct_gpt4-vision_cap100k.json",),
        images="ShareGPT4V's data/ folder "
        "(coco, llava/llava_pretrain, sam, web-celebrity, web-landmark, wikiart, share_textvqa)",
        notes=(_LCS, _SAM),
    ),
    Preset(
        name="sharegpt4v_mix665k",
        summary="ShareGPT4V SFT mix: LLaVA mix665k with 23K captions replaced by ShareGPT4V's",
        files=("sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json",),
        images="ShareGPT4V's data/ folder "
        "(the LLaVA-1.5 folders plus llava/llava_pretrain, sam, web-*, wikiart, share_textvqa)",
        alt_extensions=_OCR_VQA,
        notes=(
            _TEXT_ONLY,
            _LCS,
            _SAM,
            "OCR-VQA: the annotations name .jpg files; .gif/.png/.jpeg of the same name are found too",
        ),
    ),
):
    PRESETS.add(preset.name, preset)


def detect_preset(json_name: str, fallback: str) -> str:
    """The preset made for this exact annotation file name, else ``fallback``."""
    for name in PRESETS:
        if json_name in PRESETS.get(name).files:
            return name
    return fallback
