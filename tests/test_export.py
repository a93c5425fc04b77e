"""Checkpoint directories and the Hugging Face LLaVA export: transformers' own
``LlavaForConditionalGeneration`` must load the export cleanly and compute what lmm computes."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPEC
from PIL import Image

from lmm.checkpoints.chat_template import chat_template_for
from lmm.checkpoints.directory import load_checkpoint_dir, save_checkpoint_dir
from lmm.checkpoints.hf_export import export_llava
from lmm.commands.export import main as export_main
from lmm.data.templates import Turn, get_template
from lmm.errors import CheckpointError, ExportError
from lmm.inference.predictor import Predictor
from lmm.model.language import LanguageConfig
from lmm.model.lmm import LMM, GenerationConfig
from lmm.model.towers import VisionConfig

VICUNA = replace(get_template("vicuna"), system="A chat.")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A 2-layer random-init CLIPVisionModel (CLS token + 16 patches) with its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    out = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(1)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_SPEC.image_size,
        patch_size=TINY_SPEC.patch_size,
        projection_dim=32,
    )
    CLIPVisionModel(cfg).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_SPEC.image_size},
        crop_size={"height": TINY_SPEC.image_size, "width": TINY_SPEC.image_size},
    ).save_pretrained(out)
    return out


def _build(
    vision_path, llm_path, feature_layer: int, connector: str, seed: int = 0
) -> tuple[LMM, VisionConfig, LanguageConfig]:
    torch.manual_seed(seed)
    vision = VisionConfig(name_or_path=str(vision_path), feature_layer=feature_layer)
    llm = LanguageConfig(name_or_path=str(llm_path))
    model = LMM(vision, llm, connector).eval()
    with torch.no_grad():  # a connector that is not the default init, so a mix-up would show
        for p in model.connector.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, vision, llm


def _save(model, vision, llm, connector, out: Path, template=VICUNA) -> Path:
    return save_checkpoint_dir(
        model,
        out,
        vision=vision,
        llm=llm,
        connector=connector,
        template=template,
        max_length=128,
        generation=GenerationConfig(max_new_tokens=6),
    )


def _image(seed: int, size: int = TINY_SPEC.image_size) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


# -- checkpoint directory ------------------------------------------------------------------------


def test_checkpoint_dir_round_trip(tiny_models, tmp_path):
    model, vision, llm = _build(tiny_models["vision"], tiny_models["llm"], -2, "mlp2x_gelu")
    ckpt_dir = _save(model, vision, llm, "mlp2x_gelu", tmp_path / "ckpt")
    info = json.loads((ckpt_dir / "lmm.json").read_text())
    assert (
        info["model"]["vision"]["name_or_path"] == "vision"
        and info["model"]["vision"]["feature_layer"] == -1
    )
    assert info["data"] == {
        "template": "vicuna",
        "system_prompt": "A chat.",
        "max_length": 128,
        # Prompt conventions (lmm.data.prompts): what this model was trained and is asked with.
        "image_placement": "as_written",
        "tokenization": "single_pass",
        "image_position": "before",
        "answer_suffixes": {},
    }
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "llm",
        "lmm.json",
        "vision",
        "weights.safetensors",
    ]
    ckpt = load_checkpoint_dir(ckpt_dir)
    # Self-contained: the truncated tower (1 of 2 layers kept) was rebuilt from DIR/vision.
    assert len(ckpt.model.vision.blocks()) == 1
    assert (
        ckpt.template == VICUNA and ckpt.generation.max_new_tokens == 6 and ckpt.max_length == 128
    )
    state, loaded = model.state_dict(), ckpt.model.state_dict()
    assert state.keys() == loaded.keys()
    for k in state:
        assert torch.equal(state[k], loaded[k]), k
    pred = Predictor(ckpt.model, ckpt.template, ckpt.generation)
    sample = pred.encode_question("What color is it?", [_image(0)])
    with torch.no_grad():
        a = model.llm(
            inputs_embeds=model.embed(sample["input_ids"][None], sample["pixel_values"])
        ).logits
        b = ckpt.model.llm(
            inputs_embeds=ckpt.model.embed(sample["input_ids"][None], sample["pixel_values"])
        ).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_dir_merges_lora_adapters_without_touching_the_model(
    fresh_lmm, tiny_models, tmp_path
):
    from lmm.model.freeze import FreezeConfig
    from lmm.model.lora import has_lora

    model = fresh_lmm
    model.apply_freeze(FreezeConfig(vision="lora", llm="lora", connector="full"))
    with torch.no_grad():  # adapters start at zero; give them an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    model.eval()
    vision = VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1)
    llm = LanguageConfig(name_or_path=str(tiny_models["llm"]))
    ckpt = load_checkpoint_dir(_save(model, vision, llm, "mlp2x_gelu", tmp_path / "ckpt"))
    assert has_lora(model.llm) and has_lora(model.vision)  # the trained model keeps its adapters
    assert not has_lora(ckpt.model.llm) and not has_lora(ckpt.model.vision)
    sample = Predictor(ckpt.model, ckpt.template).encode_question("What is it?", [_image(2)])
    with torch.no_grad():
        ref = model.llm(
            inputs_embeds=model.embed(sample["input_ids"][None], sample["pixel_values"])
        ).logits
        got = ckpt.model.llm(
            inputs_embeds=ckpt.model.embed(sample["input_ids"][None], sample["pixel_values"])
        ).logits
        plain = copy.deepcopy(model)
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.zero_()
        without = plain.llm(
            inputs_embeds=plain.embed(sample["input_ids"][None], sample["pixel_values"])
        ).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(without, ref, atol=1e-3)  # the adapters mattered


def test_checkpoint_dir_errors_say_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match="no lmm.json.*transformers model folder.*python -m lmm checkpoint"
    ):
        load_checkpoint_dir(tmp_path)
    (tmp_path / "lmm.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="'format' is 'other'"):
        load_checkpoint_dir(tmp_path)


# -- chat template -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, system",
    [
        ("vicuna", None),
        ("vicuna", ""),
        ("plain", None),
        ("chatml", None),
        ("phi", None),
        ("gemma", None),
        ("qwen2_instruct", ""),
    ],
)
def test_chat_template_renders_like_lmm(tokenizer, name, system):
    template = get_template(name)
    if system is not None:
        template = replace(template, system=system)
    tokenizer = type(tokenizer).from_pretrained(
        tokenizer.name_or_path
    )  # private copy: we set its template
    tokenizer.chat_template = chat_template_for(template)
    eos = tokenizer.eos_token
    turns = [
        Turn("user", "<image>\nWhat is it?"),
        Turn("assistant", "A red circle."),
        Turn("user", "Where?"),
    ]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Where?"},
    ]
    expected, _ = template.render(turns, eos, add_generation_prompt=True)
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == expected
    )
    expected, _ = template.render(turns[:2], eos)
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False) == expected
    if name in ("vicuna", "chatml", "phi"):  # a system message replaces the default system prompt
        with_system = [{"role": "system", "content": "Be brief."}] + messages[:1]
        expected, _ = template.render(
            [Turn("system", "Be brief."), turns[0]], eos, add_generation_prompt=True
        )
        assert (
            tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
            == expected
        )


_MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "Where?"},
]
# Written out by hand: what each family's exported chat template must produce for _MESSAGES.
_EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"  # after_turn: the newline after <|im_end|>
        "<|im_start|>user\nWhere?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "phi": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is it? ASSISTANT: A red circle.<|endoftext|>"
        "USER: Where? ASSISTANT:"
    ),
    "gemma": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is it? ASSISTANT: A red circle.<eos>"
        "USER: Where? ASSISTANT:"
    ),
}


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_chat_template_text_is_exactly_the_family_format(tokenizer, name):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = chat_template_for(get_template(name))
    got = tokenizer.apply_chat_template(_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert got == _EXPECTED[name]
    # Ending on the answer: the end-of-turn (and ChatML's newline) close it, no new opener.
    end = {"chatml": "<|im_end|>\n", "phi": "<|endoftext|>", "gemma": "<eos>"}[name]
    assert tokenizer.apply_chat_template(_MESSAGES[:2], tokenize=False).endswith(
        "A red circle." + end
    )


@pytest.mark.parametrize("family", ["gemma", "qwen2"])
def test_tokenizer_template_exports_the_tokenizers_own_chat_template(tmp_path, family):
    """The family's own chat template, made to take the standard message form: content as a
    list of image/text parts (the original treats content as a string: Qwen2's raises
    ``TypeError: can only concatenate str (not "list") to str``)."""
    from lmm.model.language import LanguageConfig, load_tokenizer
    from lmm.standins.llm import build_llm

    tok = load_tokenizer(LanguageConfig(name_or_path=str(build_llm(family, tmp_path / family))))
    own = tok.chat_template
    assert own
    template = get_template("tokenizer")
    exported = chat_template_for(template, tok)
    assert exported == chat_template_for(template.bind(tok), tok) and exported.endswith(own)
    tok.chat_template = exported  # exporting again (an import of this export) changes nothing
    assert chat_template_for(template, tok) == exported
    tok.chat_template = own
    turns = [
        Turn("user", "<image>\nWhat is it?"),
        Turn("assistant", "A red circle."),
        Turn("user", "Where?"),
    ]
    strings = [{"role": t.role, "content": t.text} for t in turns]
    parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": "Where?"},
    ]
    rendered_own = tok.apply_chat_template(strings, tokenize=False, add_generation_prompt=True)
    try:  # ChatML concatenates and raises; Gemma's `| trim` writes the list's repr
        broken = tok.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    except TypeError as err:
        broken = str(err)
    assert broken != rendered_own
    tok.chat_template = exported
    for messages in (strings, parts):
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == rendered_own
    # ... which is what lmm's bound template renders (bos aside: the tokenizer adds it).
    expected, _ = template.bind(tok).render(turns, tok.eos_token, add_generation_prompt=True)
    assert rendered_own.removeprefix(tok.bos_token or "") == expected
    tok.chat_template = None
    with pytest.raises(ExportError, match="the tokenizer has no chat template"):
        chat_template_for(template, tok)


# -- export parity -------------------------------------------------------------------------------


@pytest.fixture(
    scope="module",
    params=[("siglip", -2, "mlp2x_gelu"), ("clip", -2, "linear"), ("clip", -1, "mlp2x_gelu")],
    ids=["siglip-truncated-mlp2x_gelu", "clip-truncated-linear", "clip-full-mlp2x_gelu"],
)
def exported(request, tiny_models, tiny_clip, tmp_path_factory):
    tower, feature_layer, connector = request.param
    vision_path = tiny_models["vision"] if tower == "siglip" else tiny_clip
    model, vision, llm = _build(vision_path, tiny_models["llm"], feature_layer, connector)
    root = tmp_path_factory.mktemp(f"export_{tower}_{connector}")
    ckpt = load_checkpoint_dir(_save(model, vision, llm, connector, root / "ckpt"))
    out = export_llava(ckpt, root / "hf")
    return tower, feature_layer, ckpt, out


def test_export_loads_in_transformers_without_missing_or_unexpected_keys(exported):
    from transformers import LlavaForConditionalGeneration

    tower, feature_layer, ckpt, out = exported
    hf, report = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in report.items() if v} == {}, report
    cfg = hf.config
    # lmm's kept layers (1 of 2 at feature layer -2) plus an identity layer, read at -2
    # (hidden_states[-1] means another thing in transformers 4.5x: test_export_portable).
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == ("default" if tower == "clip" else "full")
    assert cfg.image_token_id == ckpt.model.image_token_id
    assert cfg.vision_config.num_hidden_layers == (1 if feature_layer == -2 else 2) + 1
    assert cfg.projector_hidden_act == (
        "linear" if ckpt.info["model"]["connector"] == "linear" else "gelu"
    )


def test_export_matches_lmm_logits_and_greedy_text(exported):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, _, ckpt, out = exported
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    predictor = Predictor(ckpt.model, ckpt.template, GenerationConfig(max_new_tokens=8))
    image = _image(3)
    question = "What color is the circle?"
    # The processor (chat template + image-token expansion + image transform) builds lmm's prompt.
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    sample = predictor.encode_question(question, [image])
    assert inputs["input_ids"][0].tolist() == sample["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], sample["pixel_values"], rtol=0, atol=1e-5)

    with torch.no_grad():
        ours = ckpt.model.llm(
            inputs_embeds=ckpt.model.embed(sample["input_ids"][None], sample["pixel_values"])
        ).logits
        theirs = hf(
            input_ids=inputs["input_ids"],
            pixel_values=sample["pixel_values"],
            attention_mask=inputs["attention_mask"],
        ).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    generated = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
    hf_text = processor.batch_decode(
        generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )[0].strip()
    assert hf_text == predictor.generate([sample])[0]


def test_export_refuses_parts_that_do_not_fit(tiny_models, tmp_path, capsys):
    model, vision, llm = _build(tiny_models["vision"], tiny_models["llm"], -1, "pool2x2_mlp2x_gelu")
    ckpt_dir = _save(model, vision, llm, "pool2x2_mlp2x_gelu", tmp_path / "ckpt")
    with pytest.raises(
        ExportError,
        match="model.connector: 'pool2x2_mlp2x_gelu' does not fit.*exportable connectors: linear, mlp2x_gelu",
    ):
        export_llava(load_checkpoint_dir(ckpt_dir), tmp_path / "hf")
    assert export_main(["--ckpt", str(ckpt_dir), "--out", str(tmp_path / "hf")]) == 2
    assert "error: model.connector" in capsys.readouterr().err


def test_export_image_processor_prepares_images_like_lmm(exported):
    """Non-square and larger images: padded to a square with the mean colour (``pad``, the
    default), resized bicubically and normalised, as lmm's transform does (up to resampling
    rounding: a few 8-bit levels at most)."""
    from transformers import AutoProcessor

    _, _, ckpt, out = exported
    processor = AutoProcessor.from_pretrained(out)
    predictor = Predictor(ckpt.model, ckpt.template)
    assert ckpt.model.vision.image_spec.preprocess == "pad"
    for size in [(50, 30), (20, 44), (64, 64)]:
        image = _image(5).resize(size)
        theirs = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        ours = predictor.encode_question("x", [image])["pixel_values"][0]
        step = (
            1 / 255 / min(ckpt.model.vision.image_spec.std)
        )  # one 8-bit level after normalisation
        assert (theirs - ours).abs().max() <= 3 * step, size
        # The padding colour is int(mean * 255) there, rounded here: one level over the padding.
        assert (theirs - ours).abs().mean() <= step, size


# -- writing checkpoint directories from a fit and from a config ----------------------------------


def test_fit_writes_checkpoint_dir_and_checkpoint_command_rebuilds_it(
    tiny_models, tiny_world, tmp_path, capsys
):
    import yaml

    from lmm.commands.checkpoint import main as checkpoint_main
    from lmm.train.cli import LMMCLI

    root, _ = tiny_world
    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "configs" / "tiny" / "pretrain.yaml").read_text())
    cfg["trainer"].update(
        max_steps=2, logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False
    )
    cfg["model"]["vision"]["name_or_path"] = str(tiny_models["vision"])
    cfg["model"]["llm"]["name_or_path"] = str(tiny_models["llm"])
    cfg["model"].update(
        save_weights=str(tmp_path / "w.safetensors"),
        save_checkpoint_dir=str(tmp_path / "ckpt"),
        generation={"max_new_tokens": 5},
    )
    cfg["data"].update(
        train=[f"{root}/pretrain/shard-*.tar"],
        template="vicuna",
        system_prompt="Hi.",
        image_position="after",
        answer_suffixes={"pope": "\nOne word."},
        batch_size=4,
        num_workers=0,
    )
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli = LMMCLI(args=["fit", "--config", str(config)])
    assert "Wrote lmm checkpoint directory" in capsys.readouterr().out
    trained = cli.model.model.state_dict()

    from_fit = load_checkpoint_dir(tmp_path / "ckpt")
    assert from_fit.template.name == "vicuna" and from_fit.template.system == "Hi."
    # The DataModule's prompt conventions, so predict / chat / lmms-eval ask as it trained.
    assert from_fit.conventions.image_position == "after"
    assert from_fit.conventions.answer_suffixes == {"pope": "\nOne word."}
    assert (
        from_fit.generation.max_new_tokens == 5 and from_fit.max_length == cfg["data"]["max_length"]
    )
    for k, v in from_fit.model.state_dict().items():
        assert torch.equal(v, trained[k]), k

    # The same directory from the config plus the weights file, without training.
    args = [
        "--out",
        str(tmp_path / "again"),
        "--config",
        str(config),
        "--model.init_from",
        str(tmp_path / "w.safetensors"),
    ]
    assert checkpoint_main(args) == 0
    again = load_checkpoint_dir(tmp_path / "again")
    assert again.template == from_fit.template and again.conventions == from_fit.conventions
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, trained[k]), k
