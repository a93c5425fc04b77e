"""Exports load everywhere: the files use the llava-hf hub layout and tokenizer fields that
transformers 4.x and 5.x both read (transformers 5 writing its own layout would leave a 4.x
tower randomly initialised, and its tokenizer_config does not load in 4.x).

With ``LMM_TRANSFORMERS4_PATH`` pointing at a folder holding transformers 4.x (plus the
``tokenizers`` / ``huggingface_hub`` versions it needs, e.g. ``pip install --target DIR
transformers==4.57.1 tokenizers==0.22.1 huggingface_hub==0.36.0 requests``), the export is also
loaded by that transformers in a subprocess, which must report no missing tensors and compute
lmm's logits; otherwise that part is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from import_checks import image
from safetensors import safe_open

from lmm.checkpoints.directory import load_checkpoint_dir, save_checkpoint_dir
from lmm.checkpoints.hf_export import export_llava, export_onevision
from lmm.data.templates import get_template
from lmm.model.language import LanguageConfig
from lmm.model.lmm import LMM
from lmm.model.towers import VisionConfig
from lmm.visual.anyres import AnyResConfig

TRANSFORMERS4 = os.environ.get("LMM_TRANSFORMERS4_PATH")
HUB_PREFIXES = (
    "language_model.model.",
    "language_model.lm_head.",
    "vision_tower.vision_model.",
    "multi_modal_projector.",
)

# Run by transformers 4.x: load the export, report missing/unexpected tensors and the logits.
_LOAD_WITH_TRANSFORMERS4 = """
import json, sys, torch, transformers
path, cls, inputs, out = sys.argv[1:]
model, info = getattr(transformers, cls).from_pretrained(path, output_loading_info=True)
tok = transformers.AutoTokenizer.from_pretrained(path)
batch = torch.load(inputs)
with torch.no_grad():
    logits = model.eval()(**batch).logits
torch.save({"logits": logits, "ids": tok("USER: What is it? ASSISTANT:")["input_ids"]}, out)
print(json.dumps({"version": transformers.__version__, **{k: list(v) for k, v in info.items()}}))
"""


@pytest.fixture(scope="module", params=["llava", "onevision"])
def exported(request, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"portable_{request.param}")
    anyres = AnyResConfig(max_grid=2, max_tiles=3) if request.param == "onevision" else None
    vision = VisionConfig(
        name_or_path=str(tiny_models["vision"]),
        feature_layer=-1,
        image_preprocess="resize",
        anyres=anyres,
    )
    llm = LanguageConfig(name_or_path=str(tiny_models["llm"]))
    torch.manual_seed(5)
    model = LMM(vision, llm, "mlp2x_gelu").eval()
    ckpt = load_checkpoint_dir(
        save_checkpoint_dir(
            model,
            root / "ckpt",
            vision=vision,
            llm=llm,
            connector="mlp2x_gelu",
            template=get_template("vicuna"),
            max_length=128,
        )  # fmt: skip
    )
    export = export_llava if request.param == "llava" else export_onevision
    return request.param, ckpt, export(ckpt, root / "hf")


def test_export_writes_the_llava_hf_hub_layout(exported):
    kind, _, out = exported
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    extra = ("image_newline",) if kind == "onevision" else ()
    assert all(k.startswith(HUB_PREFIXES) or k in extra for k in keys), [
        k for k in keys if not k.startswith(HUB_PREFIXES)
    ]
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.0.") for k in keys)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a class 4.x and 5.x have
    assert not isinstance(tok_config.get("extra_special_tokens"), list)  # 4.x reads a dict there
    assert "<image>" in tok_config["additional_special_tokens"]
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"]  # 4.x's field beside 5.x's


def test_exported_tokenizer_encodes_as_lmm_does(exported):
    from transformers import AutoTokenizer

    _, ckpt, out = exported
    theirs, ours = AutoTokenizer.from_pretrained(out), ckpt.model.tokenizer
    for text in ("USER: <image>\nWhat is it? ASSISTANT:", "A red circle.</s>", "<image><image> x"):
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text
    assert theirs.convert_tokens_to_ids("<image>") == ckpt.model.image_token_id


@pytest.mark.skipif(
    not TRANSFORMERS4, reason="set LMM_TRANSFORMERS4_PATH to a transformers 4.x install"
)
def test_transformers4_loads_the_export_and_computes_lmms_logits(exported, tmp_path):
    from transformers import AutoProcessor

    kind, ckpt, out = exported
    processor = AutoProcessor.from_pretrained(out)
    img = image(64, 32, 1)
    parts = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True
    )
    inputs = dict(
        processor(images=[[img]] if kind == "onevision" else img, text=prompt, return_tensors="pt")
    )
    torch.save(inputs, tmp_path / "inputs.pt")
    cls = (
        "LlavaForConditionalGeneration"
        if kind == "llava"
        else "LlavaOnevisionForConditionalGeneration"
    )
    script = tmp_path / "load4.py"
    script.write_text(_LOAD_WITH_TRANSFORMERS4)
    env = {**os.environ, "PYTHONPATH": TRANSFORMERS4, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), cls, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["version"].startswith("4.")
    assert not report["missing_keys"] and not report["unexpected_keys"], report
    result = torch.load(tmp_path / "out.pt")
    assert result["ids"] == ckpt.model.tokenizer("USER: What is it? ASSISTANT:")["input_ids"]
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    hf5 = (
        LlavaForConditionalGeneration if kind == "llava" else LlavaOnevisionForConditionalGeneration
    ).from_pretrained(out)
    with torch.no_grad():
        logits5 = hf5.eval()(**inputs).logits
    torch.testing.assert_close(result["logits"], logits5, rtol=0, atol=1e-5)
