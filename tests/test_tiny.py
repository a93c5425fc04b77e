"""Tiny stand-ins: real classes, saved with save_pretrained, rebuilt when the spec changes."""

import json

from transformers import AutoConfig, AutoTokenizer

from lmm.standins.tiny import TinySpec, build_tiny_models

CORPUS = ["a red circle at the top left", "Is there a star in the image? Yes"] * 10


def test_tiny_models_load_through_auto_classes_and_follow_the_spec(tmp_path):
    spec = TinySpec(
        vision_width=16,
        vision_layers=1,
        vision_heads=2,
        llm_width=16,
        llm_layers=1,
        llm_heads=2,
        vocab_size=320,
    )
    paths = build_tiny_models(tmp_path, CORPUS, spec)
    vision, llm = (
        AutoConfig.from_pretrained(paths["vision"]),
        AutoConfig.from_pretrained(paths["llm"]),
    )
    assert (vision.model_type, llm.model_type) == ("siglip_vision_model", "llama")
    assert vision.patch_size == 8 and llm.vocab_size % 64 == 0
    tok = AutoTokenizer.from_pretrained(paths["llm"])
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    assert json.loads((tmp_path / "tiny_spec.json").read_text())["patch_size"] == 8

    # Same spec: kept as is (same files). Other spec: rebuilt.
    mtime = (paths["vision"] / "config.json").stat().st_mtime_ns
    build_tiny_models(tmp_path, CORPUS, spec)
    assert (paths["vision"] / "config.json").stat().st_mtime_ns == mtime
    spec16 = TinySpec(**{**spec.__dict__, "patch_size": 16})
    build_tiny_models(tmp_path, CORPUS, spec16)
    assert AutoConfig.from_pretrained(paths["vision"]).patch_size == 16


def test_tiny_pipeline_cli_passes_world_and_step_options(monkeypatch, tmp_path):
    """`python -m lmm tiny` flags reach the world config and the stages' trainer overrides."""
    from types import SimpleNamespace

    from lmm.commands import tiny as pipeline

    worlds, runs = [], []
    monkeypatch.setattr(pipeline, "prepare", lambda workdir, world: worlds.append(world))
    metrics = {
        s: {"f1": 0.5, "accuracy": 0.5, "yes_ratio": 0.5}
        for s in ("pope_random", "pope_popular", "pope_adversarial")
    }
    metrics["short_answer"] = {"accuracy": 0.25}

    def fake_cli(args):
        runs.append(args)
        return SimpleNamespace(model=SimpleNamespace(test_metrics=metrics))

    monkeypatch.setattr(pipeline, "run_cli", fake_cli)
    monkeypatch.setattr(pipeline, "WORKDIR", tmp_path)
    assert (
        pipeline.main(
            [
                "--caption-style",
                "grid",
                "--train-images",
                "123",
                "--pretrain-steps",
                "7",
                "--skip-control",
            ]
        )
        == 0
    )
    (world,) = worlds
    assert (world.caption_style, world.train_images) == ("grid", 123)
    assert world.balanced_exist == pipeline.TINY_WORLD.balanced_exist
    assert runs[0][-2:] == ["--trainer.max_steps", "7"] and "--trainer.max_steps" not in runs[1]
    assert len(runs) == 3  # pretrain, finetune, test: the control was skipped
    assert json.loads((tmp_path / "results" / "summary.json").read_text())["test"] == metrics
