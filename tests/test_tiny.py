"""Tiny stand-ins: real classes, saved with save_pretrained, rebuilt when the spec changes."""
import json

from transformers import AutoConfig, AutoTokenizer

from lmm.tiny import TinySpec, build_tiny_models

CORPUS = ["a red circle at the top left", "Is there a star in the image? Yes"] * 10


def test_tiny_models_load_through_auto_classes_and_follow_the_spec(tmp_path):
    spec = TinySpec(vision_width=16, vision_layers=1, vision_heads=2, llm_width=16, llm_layers=1, llm_heads=2, vocab_size=320)
    paths = build_tiny_models(tmp_path, CORPUS, spec)
    vision, llm = AutoConfig.from_pretrained(paths["vision"]), AutoConfig.from_pretrained(paths["llm"])
    assert (vision.model_type, llm.model_type) == ("siglip_vision_model", "llama")
    assert vision.patch_size == 16 and llm.vocab_size % 64 == 0
    tok = AutoTokenizer.from_pretrained(paths["llm"])
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    assert json.loads((tmp_path / "tiny_spec.json").read_text())["patch_size"] == 16

    # Same spec: kept as is (same files). Other spec: rebuilt.
    mtime = (paths["vision"] / "config.json").stat().st_mtime_ns
    build_tiny_models(tmp_path, CORPUS, spec)
    assert (paths["vision"] / "config.json").stat().st_mtime_ns == mtime
    spec8 = TinySpec(**{**spec.__dict__, "patch_size": 8})
    build_tiny_models(tmp_path, CORPUS, spec8)
    assert AutoConfig.from_pretrained(paths["vision"]).patch_size == 8
