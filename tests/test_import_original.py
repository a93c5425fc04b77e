"""``lmm import`` of the original LLaVA repository's and TinyLLaVA_Factory's checkpoints.

The sources are written in those repositories' exact file layout and config fields
(``released_models``); their code is never run. The reference is the same composition built
from transformers' own tower and LM classes holding the checkpoint's tensors: features
``hidden_states[layer][:, 1:]``, the projector (Linear, exact GELU, Linear), spliced into the
LM's input embeddings where LLaVA's ``tokenizer_image_token`` puts the image id -200.
"""

from __future__ import annotations

import json

import pytest
import torch
from import_checks import (
    assert_lora_changed_the_lm,
    image,
    lora_fit,
    needs_reference_text,
    same_conventions,
)
from released_models import IMAGE, build_llava_original, build_tinyllava

from lmm.checkpoints.directory import load_checkpoint_dir
from lmm.checkpoints.formats import ImportOptions, import_checkpoint
from lmm.checkpoints.formats.common import read_tensors
from lmm.checkpoints.hf_export import export_llava
from lmm.data.image import ImageTransform
from lmm.data.templates import VICUNA_SYSTEM
from lmm.errors import ExportError, ImportFormatError

QUESTION = "What is in the picture?"
IMAGE_INDEX = -200  # llava/constants.py and tinyllava/utils/constants.py IMAGE_TOKEN_INDEX


def tokenizer_image_token(tok, prompt: str) -> list[int]:
    """haotian-liu/LLaVA ``llava/mm_utils.py`` ``tokenizer_image_token`` (TinyLLaVA's
    ``tinyllava/data/template/base.py`` ``tokenizer_image_token`` is the same rule): each chunk
    between ``<image>`` tokenized on its own, a leading bos kept on the first chunk only, -200
    between chunks."""
    chunks = [tok(c)["input_ids"] for c in prompt.split("<image>")]
    bos = tok.bos_token_id
    offset = 1 if bos is not None and chunks[0][:1] == [bos] else 0
    ids = chunks[0][:]
    for chunk in chunks[1:]:
        ids += [IMAGE_INDEX] + chunk[offset:]
    return ids


def _reference_prompt(fmt: str, tok) -> str:
    """The evaluation prompt: LLaVA-1.5 ``conv_vicuna_v1`` (llava/conversation.py); TinyLLaVA's
    ``phi`` template (tinyllava/data/template/phi_template.py: the same Vicuna turns)."""
    return f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"


def _lmm_ids(ckpt, reference_ids: list[int]) -> torch.Tensor:
    n = ckpt.model.num_image_tokens
    out: list[int] = []
    for i in reference_ids:
        out += [ckpt.model.image_token_id] * n if i == IMAGE_INDEX else [i]
    return torch.tensor([out])


@pytest.fixture(scope="module", params=["llava", "tinyllava-phi", "tinyllava-llama"])
def released(request, tmp_path_factory):
    """(format, SRC, imported directory, reference, notes): LLaVA-1.5 (CLIP + Llama), TinyLLaVA
    with SigLIP + Phi-2 (as TinyLLaVA-Phi-2-SigLIP-3.1B) and with SigLIP + TinyLlama."""
    fmt, _, family = request.param.partition("-")
    root = tmp_path_factory.mktemp(request.param)
    if fmt == "llava":
        src, tower, reference = build_llava_original(root)
    else:
        src, tower, reference = build_tinyllava(root, family)
    out, notes = import_checkpoint(fmt, src, root / "ckpt", ImportOptions(vision_tower=str(tower)))
    return fmt, src, out, reference, notes


def _reference_pixels(fmt: str, reference, img) -> torch.Tensor:
    """LLaVA-1.5 (``image_aspect_ratio: pad``): ``expand2square`` with ``int(mean * 255)`` then the
    CLIP processor (llava/mm_utils.py ``process_images``); TinyLLaVA (``square``): the SigLIP
    processor alone (tinyllava/data/image_preprocess.py)."""
    from PIL import Image
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if fmt == "llava":
        processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
        )
        w, h = img.size
        if w != h:
            side = max(w, h)
            square = Image.new(
                "RGB", (side, side), tuple(int(m * 255) for m in processor.image_mean)
            )
            square.paste(img, ((side - w) // 2, (side - h) // 2))
            img = square
    else:
        processor = SiglipImageProcessor(
            size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    return processor(images=img, return_tensors="pt")["pixel_values"]


def test_import_computes_the_reference_logits_and_greedy_text(released):
    fmt, _, out, reference, _ = released
    ckpt = load_checkpoint_dir(out)
    tok = reference.tokenizer
    ref_ids = tokenizer_image_token(tok, _reference_prompt(fmt, tok))
    pixels = _reference_pixels(fmt, reference, image(IMAGE, IMAGE, 1))
    embeds = reference.embeds(ref_ids, pixels)
    with torch.no_grad():
        theirs = reference.lm(inputs_embeds=embeds).logits
    ids = _lmm_ids(ckpt, ref_ids)
    ours = ckpt.model.llm(inputs_embeds=ckpt.model.embed(ids, pixels)).logits.detach()
    vocab = theirs.shape[-1]  # lmm may add rows for <image> (LLaVA splices at -200 instead)
    assert ours.shape[:2] == theirs.shape[:2]
    torch.testing.assert_close(ours[..., :vocab], theirs, rtol=0, atol=1e-5)
    generated = reference.lm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    reference_text = tok.decode(generated[0], skip_special_tokens=True).strip()
    ours_text = ckpt.model.generate_text(
        ids, torch.ones_like(ids), pixels, max_new_tokens=8, stop_token_ids=[]
    )[0]
    assert ours_text == reference_text


def test_import_records_the_reference_settings(released):
    fmt, src, out, _, notes = released
    info = json.loads((out / "lmm.json").read_text())
    vision = info["model"]["vision"]
    # Both: hidden_states[-2] with the first token dropped (TinyLLaVA drops it on SigLIP too).
    assert (vision["feature_layer"], vision["select"]) == (-2, "patch")
    assert vision["image_preprocess"] == ("pad" if fmt == "llava" else "resize")
    assert info["model"]["connector"] == "mlp2x_gelu"
    data = info["data"]
    family = json.loads((src / "config.json").read_text()).get("text_config", {}).get("model_type")
    assert data["template"] == ("phi" if family == "phi" else "vicuna")  # the Factory's pairing
    assert data["system_prompt"] == VICUNA_SYSTEM
    assert data["max_length"] == (2048 if fmt == "llava" else 3072)
    assert (data["image_placement"], data["tokenization"]) == ("llava", "chunked")
    assert (
        data["answer_suffixes"]["mmbench"]
        == "\nAnswer with the option's letter from the given choices directly."
    )
    assert info["source"]["format"] == fmt and info["source"]["path"] == str(src)


def test_import_prepares_images_like_the_reference(released):
    """At the tower's size exactly; padded / squashed non-square images within resampling
    rounding (and LLaVA's ``int(mean * 255)`` pad colour vs lmm's rounded one: issue 17)."""
    fmt, _, out, reference, _ = released
    spec = load_checkpoint_dir(out).model.vision.image_spec
    step = 1 / 255 / min(spec.std)
    for size, tolerance in (((IMAGE, IMAGE), 1e-6), ((50, 30), 4 * step)):
        img = image(*size, seed=2)
        theirs = _reference_pixels(fmt, reference, img)[0]
        ours = ImageTransform(spec)(img)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)


@needs_reference_text
def test_import_builds_the_reference_prompt_ids(released):
    from lmm.inference.predictor import Predictor

    fmt, _, out, reference, _ = released
    ckpt = load_checkpoint_dir(out)
    tok = reference.tokenizer
    expected = _lmm_ids(ckpt, tokenizer_image_token(tok, _reference_prompt(fmt, tok)))
    sample = Predictor.from_checkpoint(ckpt).encode_question(QUESTION, [image(IMAGE, IMAGE, 3)])
    assert sample["input_ids"].tolist() == expected[0].tolist()


def test_import_fine_tunes_with_lora_and_exports_to_llava_hf(released, tiny_world, tmp_path):
    """Two LoRA steps from the imported directory, then the export loads in transformers and
    computes lmm's logits (Phi-2's biased LM head has no LLaVA equivalent: a clear refusal)."""
    from transformers import LlavaForConditionalGeneration

    _, _, out, _, _ = released
    root, _ = tiny_world
    tuned_dir = lora_fit(out, f"{root}/finetune/shard-*.tar", tmp_path)
    before, tuned = load_checkpoint_dir(out), load_checkpoint_dir(tuned_dir)
    assert_lora_changed_the_lm(before, tuned)
    assert same_conventions(tuned, before)
    if tuned.model.llm.get_output_embeddings().bias is not None:  # Phi-2
        with pytest.raises(ExportError, match="LM head of PhiForCausalLM has a bias"):
            export_llava(tuned, tmp_path / "hf")
        return
    hf, report = LlavaForConditionalGeneration.from_pretrained(
        export_llava(tuned, tmp_path / "hf"), output_loading_info=True
    )
    assert not any(report.values()), report
    n = tuned.model.num_image_tokens
    ids = torch.tensor([[5] + [tuned.model.image_token_id] * n + [40, 41, 42]])
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, pixel_values=pixels).logits
        ours = tuned.model.llm(inputs_embeds=tuned.model.embed(ids, pixels)).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_llava_import_adds_an_image_token_that_never_wins_greedy_decoding(released):
    """LLaVA's vocabulary has no <image> (features go where -200 is): lmm adds it and pads the
    rows to a multiple of 64 with the mean row, whose logit is the mean logit."""
    fmt, _, out, reference, _ = released
    if fmt != "llava":
        pytest.skip("TinyLLaVA's Phi-2 has spare rows: nothing is added")
    ckpt = load_checkpoint_dir(out)
    rows = reference.lm.get_input_embeddings().weight.shape[0]
    head = ckpt.model.llm.get_output_embeddings().weight
    assert head.shape[0] % 64 == 0 and ckpt.model.image_token_id >= rows
    assert torch.equal(head[:rows], reference.lm.get_output_embeddings().weight)
    torch.testing.assert_close(head[rows:], head[:rows].mean(0).expand(head.shape[0] - rows, -1))


def test_original_formats_refuse_what_lmm_cannot_read(tmp_path):
    root = tmp_path / "src"
    src, tower, _ = build_llava_original(root)
    with pytest.raises(ImportFormatError, match="not a local folder.*--vision-tower"):
        import_checkpoint("llava", src, tmp_path / "x")  # mm_vision_tower is a hub name
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "mm_use_im_start_end": True}))
    with pytest.raises(ImportFormatError, match="mm_use_im_start_end"):
        import_checkpoint("llava", src, tmp_path / "x", ImportOptions(vision_tower=str(tower)))
    (src / "config.json").write_text(json.dumps({**config, "mm_projector_type": "qformer"}))
    with pytest.raises(ImportFormatError, match="mm_projector_type 'qformer' has no lmm connector"):
        import_checkpoint("llava", src, tmp_path / "x", ImportOptions(vision_tower=str(tower)))


class _NotATensor:
    pass


def test_bin_weights_are_loaded_without_unpickling_code(tmp_path):
    torch.save({"w": torch.zeros(2), "x": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ImportFormatError, match="weights_only=True.*never unpickles code"):
        read_tensors(tmp_path)
    torch.save({"w": torch.arange(3.0)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(read_tensors(tmp_path)["w"], torch.arange(3.0))
