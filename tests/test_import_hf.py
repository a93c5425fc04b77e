"""``lmm import`` of transformers LLaVA / LLaVA-OneVision folders, and the exact round trips.

The sources are tiny random models written by transformers' own classes and processors; after
import, lmm must compute the reference model's logits (fp32, 1e-5) and greedy text from the
reference processor's inputs, prepare images and count image tokens as that processor does,
fine-tune with LoRA and export back. ``export(import(y))`` gives y's tensors bit for bit, and
``import(export(x))`` gives lmm checkpoint x's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from import_checks import (
    assert_lora_changed_the_lm,
    image,
    lora_fit,
    needs_reference_text,
    same_conventions,
)
from released_models import IMAGE, build_llava_hf, build_onevision_hf

from lmm.checkpoints.directory import load_checkpoint_dir, save_checkpoint_dir
from lmm.checkpoints.formats import ImportOptions, import_checkpoint
from lmm.checkpoints.hf_export import export_llava, export_onevision
from lmm.data.image import ImageTransform
from lmm.data.templates import get_template
from lmm.data.visuals import placeholders, tiles
from lmm.errors import ImportFormatError
from lmm.model.language import LanguageConfig
from lmm.model.lmm import LMM
from lmm.model.towers import VisionConfig
from lmm.visual.anyres import AnyResConfig
from lmm.visual.image_batch import ImageBatch
from lmm.visual.layout import Visual
from lmm.visual.video import VideoConfig

QUESTION = "What is in the picture?"


def _state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _lmm_logits(ckpt, ids: torch.Tensor, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return ckpt.model.llm(inputs_embeds=ckpt.model.embed(ids, pixel_values)).logits


def _greedy(ckpt, ids: torch.Tensor, pixel_values, n: int = 8) -> str:
    return ckpt.model.generate_text(
        ids, torch.ones_like(ids), pixel_values, max_new_tokens=n, stop_token_ids=[]
    )[0]


def _hf_greedy(hf, processor, inputs, n: int = 8) -> str:
    out = hf.generate(**inputs, max_new_tokens=n, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[
        0
    ].strip()


# -- LlavaForConditionalGeneration ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["clip", "siglip"])
def llava_hf(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"llava_hf_{request.param}")
    src = build_llava_hf(root, tower=request.param)
    out, _ = import_checkpoint("llava_hf", src, root / "ckpt")
    return src, out


def test_llava_hf_import_computes_the_reference_logits_and_greedy_text(llava_hf):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src, out = llava_hf
    hf = LlavaForConditionalGeneration.from_pretrained(src).eval()
    processor = AutoProcessor.from_pretrained(src)
    ckpt = load_checkpoint_dir(out)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    for img in (image(IMAGE, IMAGE, 1), image(50, 30, 2)):
        inputs = processor(images=img, text=prompt, return_tensors="pt")
        with torch.no_grad():
            reference = hf(**inputs).logits
        ours = _lmm_logits(ckpt, inputs["input_ids"], inputs["pixel_values"])
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
        assert _greedy(ckpt, inputs["input_ids"], inputs["pixel_values"]) == _hf_greedy(
            hf, processor, inputs
        )


def test_llava_hf_import_records_the_reference_settings(llava_hf):
    src, out = llava_hf
    info = json.loads((out / "lmm.json").read_text())
    vision = info["model"]["vision"]
    # LLaVA-1.5: hidden_states[-2], first token dropped; the tower is kept whole (3 layers).
    assert (vision["feature_layer"], vision["select"]) == (-2, "patch")
    assert json.loads((out / "vision" / "config.json").read_text())["num_hidden_layers"] == 3
    data = info["data"]
    assert data["template"] == "vicuna" and data["system_prompt"].startswith("A chat between")
    assert (data["image_placement"], data["tokenization"], data["image_position"]) == (
        "llava",
        "chunked",
        "before",
    )
    assert data["answer_suffixes"]["pope"] == "\nAnswer the question using a single word or phrase."
    assert info["source"] == {"format": "llava_hf", "path": str(src)}


def test_llava_hf_import_prepares_images_like_the_processor(llava_hf):
    """Square images: as the reference processor (exact at the tower's size, resampling apart
    when resized). CLIP's processor centre-crops non-square images, which lmm cannot (noted)."""
    from transformers import AutoProcessor

    src, out = llava_hf
    processor = AutoProcessor.from_pretrained(src)
    spec = load_checkpoint_dir(out).model.vision.image_spec
    step = 1 / 255 / min(spec.std)  # one 8-bit level after normalisation
    for size, tolerance in ((IMAGE, 1e-6), (3 * IMAGE, 3 * step)):
        img = image(size, size, 3)
        theirs = processor.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ImageTransform(spec)(img), theirs, rtol=0, atol=tolerance)


def test_llava_hf_export_of_import_gives_the_source_back_bit_for_bit(llava_hf, tmp_path):
    from transformers import LlavaForConditionalGeneration

    src, out = llava_hf
    back = export_llava(load_checkpoint_dir(out), tmp_path / "back")
    a = LlavaForConditionalGeneration.from_pretrained(src)
    b, report = LlavaForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert not any(report.values()), report
    _state_equal(a.state_dict(), b.state_dict())
    for field in (
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "image_token_id",
        "projector_hidden_act",
    ):
        assert getattr(a.config, field) == getattr(b.config, field), field


def test_llava_hf_import_fine_tunes_with_lora_and_exports_back(llava_hf, tiny_world, tmp_path):
    from transformers import LlavaForConditionalGeneration

    _, out = llava_hf
    root, _ = tiny_world
    tuned_dir = lora_fit(out, f"{root}/finetune/shard-*.tar", tmp_path)
    before, tuned = load_checkpoint_dir(out), load_checkpoint_dir(tuned_dir)
    assert_lora_changed_the_lm(before, tuned)
    assert same_conventions(tuned, before) and tuned.template == before.template
    hf_dir = export_llava(tuned, tmp_path / "hf")
    hf, report = LlavaForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(report.values()), report
    ids = torch.tensor(
        [[1] + [tuned.model.image_token_id] * tuned.model.num_image_tokens + [40, 41, 42]]
    )
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(_lmm_logits(tuned, ids, pixels), theirs, rtol=0, atol=1e-5)


@needs_reference_text
def test_llava_hf_import_builds_the_reference_prompt_ids(llava_hf):
    """LLaVA-1.5's prompt (vicuna_v1: system, ``USER: <image>\\nq ASSISTANT:``) tokenized as
    haotian-liu/LLaVA ``llava/mm_utils.py`` ``tokenizer_image_token`` does: each chunk between
    images on its own (bos kept on the first only), the image id between chunks; then the
    image token repeated for its features as ``LlavaProcessor`` expands it."""
    from transformers import AutoProcessor

    from lmm.data.templates import VICUNA_SYSTEM
    from lmm.inference.predictor import Predictor

    src, out = llava_hf
    processor = AutoProcessor.from_pretrained(src)
    tok = processor.tokenizer
    ckpt = load_checkpoint_dir(out)
    text = f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    chunks = [tok(c)["input_ids"] for c in text.split("<image>")]
    drop = 1 if tok.bos_token_id is not None and chunks[1][:1] == [tok.bos_token_id] else 0
    n = ckpt.model.num_image_tokens
    expected = chunks[0] + [ckpt.model.image_token_id] * n + chunks[1][drop:]
    img = image(IMAGE, IMAGE, 4)
    sample = Predictor.from_checkpoint(ckpt).encode_question(QUESTION, [img])
    assert sample["input_ids"].tolist() == expected
    reference = processor(images=img, text=text, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(sample["pixel_values"], reference, rtol=0, atol=1e-6)


# -- LlavaOnevisionForConditionalGeneration ------------------------------------------------------


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    root = tmp_path_factory.mktemp("onevision_hf")
    src = build_onevision_hf(root)
    out, _ = import_checkpoint("llava_onevision_hf", src, root / "ckpt")
    return src, out


def _ov_inputs(processor, images=None, videos=None):
    """One sample's processor inputs (its images as one list: several images are one sample's)."""
    parts = [{"type": "image"}] * len(images or []) + [{"type": "video"}] * len(videos or [])
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(
        images=[images] if images else None, videos=videos, text=prompt, return_tensors="pt"
    )


def _ov_batch(ckpt, inputs, visuals: list[Visual]) -> ImageBatch:
    """The processor's pixels as lmm's ImageBatch (its zero padding of views removed)."""
    layout = ckpt.model.image_layout
    if "pixel_values_videos" in inputs:
        pixels = inputs["pixel_values_videos"][0]
    else:
        pixels = torch.cat(
            [inputs["pixel_values"][i, : layout.tiles(v)] for i, v in enumerate(visuals)]
        )
    return ImageBatch.of_sample(pixels, visuals)


def test_onevision_import_reads_grids_budget_newline_and_video(onevision):
    from transformers import LlavaOnevisionForConditionalGeneration

    src, out = onevision
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(src)
    ckpt = load_checkpoint_dir(out)
    layout = ckpt.model.image_layout
    assert layout.anyres.grids == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
        (1, 3),
        (3, 1),
    ]  # pinpoints / 32 px
    assert (layout.anyres.max_tiles, layout.anyres.shrink_tolerance) == (2, 1.1)  # anyres_max_2
    assert layout.video.pool == 2 and ckpt.model.vision.image_spec.preprocess == "resize"
    assert torch.equal(ckpt.model.connector.image_newline, hf.model.image_newline)
    assert ckpt.template.name == "chatml" and ckpt.template.system == "You are a helpful assistant."


@pytest.mark.parametrize(
    "size", [(32, 32), (64, 32), (32, 64), (64, 64), (96, 32), (50, 30), (41, 90)]
)
def test_onevision_import_matches_transformers_on_single_images(onevision, size):
    """Every grid, the unpadding and the budget (64x64 and 2x1 maps shrink): lmm's token count
    is the processor's, and lmm's logits on the processor's inputs are the model's."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    src, out = onevision
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(src).eval()
    processor = AutoProcessor.from_pretrained(src)
    ckpt = load_checkpoint_dir(out)
    img = image(*size, seed=sum(size))
    inputs = _ov_inputs(processor, images=[img])
    ((visual, _),) = placeholders({"id": "x"}, [img], ckpt.model.image_layout)
    assert ckpt.model.image_layout.count(visual) == int(
        (inputs["input_ids"] == ckpt.model.image_token_id).sum()
    )
    with torch.no_grad():
        reference = hf(**inputs).logits
    ours = _lmm_logits(ckpt, inputs["input_ids"], _ov_batch(ckpt, inputs, [visual]))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    if size == (64, 32):
        batch = _ov_batch(ckpt, inputs, [visual])
        assert _greedy(ckpt, inputs["input_ids"], batch) == _hf_greedy(hf, processor, inputs)


def test_onevision_import_matches_transformers_on_two_images_and_video(onevision):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    src, out = onevision
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(src).eval()
    processor = AutoProcessor.from_pretrained(src)
    ckpt = load_checkpoint_dir(out)
    images = [image(64, 32, 5), image(32, 32, 6)]
    inputs = _ov_inputs(processor, images=images)
    visuals = [Visual("multi", 64, 32), Visual("multi", 32, 32)]  # base view + newline each
    with torch.no_grad():
        reference = hf(**inputs).logits
    torch.testing.assert_close(
        _lmm_logits(ckpt, inputs["input_ids"], _ov_batch(ckpt, inputs, visuals)),
        reference,
        rtol=0,
        atol=1e-5,
    )

    frames = [image(32, 32, 10 + i) for i in range(4)]
    inputs = _ov_inputs(processor, videos=[frames])
    video_id = hf.config.video_token_id
    # lmm stands for a clip by one <image> placeholder; the tokens it expands to are the same.
    ids = torch.where(
        inputs["input_ids"] == video_id, ckpt.model.image_token_id, inputs["input_ids"]
    )
    visual = Visual("video", 32, 32, frames=4)
    assert ckpt.model.image_layout.count(visual) == int((inputs["input_ids"] == video_id).sum())
    with torch.no_grad():
        reference = hf(**inputs).logits
    torch.testing.assert_close(
        _lmm_logits(ckpt, ids, _ov_batch(ckpt, inputs, [visual])), reference, rtol=0, atol=1e-5
    )


def test_onevision_import_prepares_crops_like_the_processor(onevision):
    """Images whose grid needs no padding: lmm's base view and crops are the processor's
    (exact when nothing is resampled, else within resampling rounding: PIL vs torchvision). Padded grids differ in
    the padding colour (black there, the mean colour in lmm: issue 17)."""
    from transformers import AutoProcessor

    src, out = onevision
    processor = AutoProcessor.from_pretrained(src)
    ckpt = load_checkpoint_dir(out)
    layout, spec = ckpt.model.image_layout, ckpt.model.vision.image_spec
    step = 1 / 255 / min(spec.std)
    for size, tolerance in (
        ((32, 32), 1e-6),
        ((64, 64), 2 * step),
        ((64, 32), 2 * step),
        ((32, 64), 2 * step),
    ):
        img = image(*size, seed=3)
        theirs = processor.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        ((visual, imgs),) = placeholders({"id": "x"}, [img], layout)
        ours = tiles(visual, imgs, layout, ImageTransform(spec))
        torch.testing.assert_close(ours, theirs[: len(ours)], rtol=0, atol=tolerance)


@needs_reference_text
def test_onevision_import_builds_the_reference_prompt_ids(onevision):
    """OneVision's prompt (LLaVA-NeXT ``conv_qwen``: ChatML with its default system turn,
    ``<image>\n`` before the question) expanded by ``LlavaOnevisionProcessor``: the same ids."""
    from transformers import AutoProcessor

    from lmm.inference.predictor import Predictor

    src, out = onevision
    processor = AutoProcessor.from_pretrained(src)
    ckpt = load_checkpoint_dir(out)
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    for size in ((64, 32), (50, 30)):
        img = image(*size, seed=9)
        expected = processor(images=[[img]], text=text, return_tensors="pt")["input_ids"][0]
        sample = Predictor.from_checkpoint(ckpt).encode_question(QUESTION, [img])
        assert sample["input_ids"].tolist() == expected.tolist()


def test_onevision_export_of_import_gives_the_source_back_bit_for_bit(onevision, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    src, out = onevision
    back = export_onevision(load_checkpoint_dir(out), tmp_path / "back")
    a = LlavaOnevisionForConditionalGeneration.from_pretrained(src)
    b, report = LlavaOnevisionForConditionalGeneration.from_pretrained(
        back, output_loading_info=True
    )
    assert not any(report.values()), report
    _state_equal(a.state_dict(), b.state_dict())
    for field in (
        "image_grid_pinpoints",
        "vision_aspect_ratio",
        "image_token_id",
        "video_token_id",
    ):
        assert getattr(a.config, field) == getattr(b.config, field), field


def test_onevision_import_fine_tunes_with_lora_and_exports_back(onevision, tiny_world, tmp_path):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    _, out = onevision
    root, _ = tiny_world
    tuned_dir = lora_fit(out, f"{root}/finetune/shard-*.tar", tmp_path)
    before, tuned = load_checkpoint_dir(out), load_checkpoint_dir(tuned_dir)
    assert_lora_changed_the_lm(before, tuned)
    assert tuned.model.image_layout == before.model.image_layout
    hf_dir = export_onevision(tuned, tmp_path / "hf")
    hf, report = LlavaOnevisionForConditionalGeneration.from_pretrained(
        hf_dir, output_loading_info=True
    )
    assert not any(report.values()), report
    processor = AutoProcessor.from_pretrained(hf_dir)
    img = image(64, 32, 8)
    inputs = _ov_inputs(processor, images=[img])
    ((visual, _),) = placeholders({"id": "x"}, [img], tuned.model.image_layout)
    with torch.no_grad():
        theirs = hf.eval()(**inputs).logits
    ours = _lmm_logits(tuned, inputs["input_ids"], _ov_batch(tuned, inputs, [visual]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# -- import(export(x)) for lmm's own checkpoints ---------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "onevision"])
def test_import_of_export_gives_the_lmm_checkpoint_back_bit_for_bit(kind, tiny_models, tmp_path):
    anyres = AnyResConfig(max_grid=2, max_tiles=3) if kind == "onevision" else None
    video = VideoConfig(max_frames=4) if kind == "onevision" else None
    vision = VisionConfig(
        name_or_path=str(tiny_models["vision"]),
        feature_layer=-2,
        image_preprocess="resize",
        anyres=anyres,
        video=video,
    )
    llm = LanguageConfig(name_or_path=str(tiny_models["llm"]))
    torch.manual_seed(3)
    model = LMM(vision, llm, "mlp2x_gelu").eval()
    from lmm.data.prompts import PromptConventions

    conventions = PromptConventions(
        image_position="after", answer_suffixes={"pope": "\nShort answer."}
    )
    x = load_checkpoint_dir(
        save_checkpoint_dir(
            model,
            tmp_path / "x",
            vision=vision,
            llm=llm,
            connector="mlp2x_gelu",
            template=get_template("vicuna"),
            max_length=200,
            conventions=conventions,
        )
    )
    export = export_llava if kind == "llava" else export_onevision
    fmt = "llava_hf" if kind == "llava" else "llava_onevision_hf"
    back_dir, _ = import_checkpoint(fmt, export(x, tmp_path / "hf"), tmp_path / "back")
    back = load_checkpoint_dir(back_dir)
    _state_equal(x.model.state_dict(), back.model.state_dict())
    assert (
        back.template == x.template and back.max_length == 200 and back.conventions == conventions
    )
    assert back.model.image_layout == x.model.image_layout
    assert back.model.vision.image_spec == x.model.vision.image_spec


# -- refusals --------------------------------------------------------------------------------------


def test_import_refuses_the_wrong_format_with_a_hint(llava_hf, onevision, tmp_path):
    src, _ = llava_hf
    with pytest.raises(
        ImportFormatError, match="model_type is 'llava', expected 'llava_onevision'"
    ):
        import_checkpoint("llava_onevision_hf", src, tmp_path / "x")
    with pytest.raises(ImportFormatError, match="no such directory"):
        import_checkpoint("llava_hf", tmp_path / "missing", tmp_path / "x")
    with pytest.raises(
        ImportFormatError, match="not an original LLaVA checkpoint.*--from llava_hf"
    ):
        import_checkpoint("llava", src, tmp_path / "x")
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text(
        json.dumps({"model_type": "llava", "mm_vision_tower": "x"})
    )
    with pytest.raises(ImportFormatError, match="original LLaVA checkpoint.*use --from llava$"):
        import_checkpoint("llava_hf", original, tmp_path / "x")


def test_import_command_writes_the_directory_and_prints_the_fit_config(llava_hf, tmp_path, capsys):
    import yaml

    from lmm.commands.import_ import main

    src, _ = llava_hf
    assert main(["--from", "llava_hf", str(src), "--out", str(tmp_path / "ckpt"), "--max-length", "300",
                 "--image-position", "after"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed[printed.index("model:") :])
    assert cfg["model"]["init_from"] == str((tmp_path / "ckpt" / "weights.safetensors").resolve())
    assert cfg["data"]["max_length"] == 300 and cfg["data"]["image_position"] == "after"
    with pytest.raises(SystemExit):  # argparse: not one of the registry's formats
        main(["--from", "nope", str(src), "--out", str(tmp_path / "x")])
    assert main(["--from", "tinyllava", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "model_type is 'llava', expected 'tinyllava'" in capsys.readouterr().err


def test_import_options_override_the_reference(llava_hf, tmp_path):
    src, _ = llava_hf
    options = ImportOptions(template="vicuna", system_prompt="", image_position="after")
    out, _ = import_checkpoint("llava_hf", src, tmp_path / "ckpt", options)
    ckpt = load_checkpoint_dir(out)
    assert ckpt.template.system == "" and ckpt.conventions.image_position == "after"
    assert Path(out, "vision").is_dir()
