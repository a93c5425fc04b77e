"""Prompt conventions in checkpoint directories: every consumer (predict, chat, the lmms-eval
adapter) asks a model the way it was trained, per its ``lmm.json``; ``chat`` takes its
``max_length``; the lmms-eval entry point exits non-zero when an evaluation fails."""

from __future__ import annotations

import io
import json
import sys
import types
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY_SPEC
from PIL import Image

from lmm.checkpoints.directory import load_checkpoint_dir, save_checkpoint_dir
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.prompts import LLAVA_ANSWER_SUFFIXES, PromptConventions
from lmm.data.templates import get_template
from lmm.errors import ConfigError
from lmm.inference.chat import chat_loop
from lmm.inference.predictor import Predictor, answer_questions
from lmm.model.language import LanguageConfig
from lmm.model.towers import VisionConfig

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = replace(get_template("vicuna"), system="")
QUESTION = "What color is the circle?"


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    size = TINY_SPEC.image_size
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


def _save(
    model, tiny_models, out: Path, conventions: PromptConventions, max_length: int = 256
) -> Path:
    return save_checkpoint_dir(
        model,
        out,
        vision=VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        llm=LanguageConfig(name_or_path=str(tiny_models["llm"])),
        connector="mlp2x_gelu",
        template=TEMPLATE,
        max_length=max_length,
        conventions=conventions,
    )


@pytest.fixture(scope="module")
def after_dir(lmm_model, tiny_models, tmp_path_factory) -> Path:
    """A checkpoint trained as the tiny world writes its samples: ``question\\n<image>``."""
    conventions = PromptConventions(
        image_position="after", answer_suffixes=dict(LLAVA_ANSWER_SUFFIXES)
    )
    return _save(lmm_model, tiny_models, tmp_path_factory.mktemp("after") / "ckpt", conventions)


def _training_prompt_ids(ckpt) -> list[int]:
    """The ids the model saw in training before its answer (the DataModule's encoder on a tiny
    world sample), which must also be the start of the training sequence."""
    m = ckpt.model
    processor = Processor(m.tokenizer, m.vision.image_spec, m.num_image_tokens, m.image_token_id)
    conv = ckpt.conventions  # as the tiny configs train: image_placement as_written, single_pass
    encoder = SampleEncoder(
        processor,
        ckpt.template,
        256,
        image_placement=conv.image_placement,
        tokenization=conv.tokenization,
    )
    meta = {
        "id": "s",
        "conversations": [
            {"from": "human", "value": f"{QUESTION}\n<image>"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    prompt = encoder.encode_prompt(meta, [_image()])["input_ids"].tolist()
    assert encoder.encode_train(meta, [_image()])["input_ids"].tolist()[: len(prompt)] == prompt
    return prompt


def test_tiny_config_records_where_its_world_puts_the_image():
    from lmm.worlds.shapes.tiny import TINY_WORLD

    assert TINY_WORLD.image_after_question
    for config in ("configs/tiny/finetune.yaml", "configs/tiny_ov/finetune.yaml"):
        assert yaml.safe_load((REPO / config).read_text())["data"]["image_position"] == "after", (
            config
        )


def test_predict_chat_and_lmms_eval_ask_as_the_model_was_trained(after_dir, monkeypatch):
    from lmm.eval.lmms_eval_model import LMMEvalModel

    ckpt = load_checkpoint_dir(after_dir)
    assert ckpt.conventions.image_position == "after"
    expected = _training_prompt_ids(ckpt)

    predictor = Predictor.from_checkpoint(ckpt)
    assert predictor.encode_question(QUESTION, [_image()])["input_ids"].tolist() == expected
    # The convention matters: asked image-first, the same model gets other ids.
    before = Predictor(ckpt.model, ckpt.template, max_length=256)
    assert before.encode_question(QUESTION, [_image()])["input_ids"].tolist() != expected

    seen: list[list[int]] = []
    monkeypatch.setattr(
        predictor,
        "generate",
        lambda samples, g=None: [seen.append(s["input_ids"].tolist()) or "Red." for s in samples],
    )
    chat_loop(predictor, _image(), io.StringIO(QUESTION + "\n"), io.StringIO(), io.StringIO())
    assert seen == [expected]

    adapter = LMMEvalModel(ckpt=str(after_dir), device="cpu")
    adapter.task_dict = {"toy": {"test": [{"image": _image()}]}}
    asked: list[list[int]] = []

    def generate_all(samples, generation=None, batch_size=None):
        asked.extend(s["input_ids"].tolist() for s in samples)
        return ["Red."] * len(samples)

    monkeypatch.setattr(adapter.predictor, "generate_all", generate_all)
    request = SimpleNamespace(
        args=(QUESTION, {"max_new_tokens": 2}, lambda doc: [doc["image"]], 0, "toy", "test")
    )
    assert adapter.generate_until([request]) == ["Red."]
    assert asked == [expected]


def test_checkpoints_without_conventions_read_as_they_were_written(after_dir, tmp_path):
    """A directory from before these keys: as_written / single_pass / image first (what it was
    trained and asked with), no answer suffixes."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(after_dir, old)
    info = json.loads((old / "lmm.json").read_text())
    for key in ("image_placement", "tokenization", "image_position", "answer_suffixes"):
        del info["data"][key]
    (old / "lmm.json").write_text(json.dumps(info))
    assert load_checkpoint_dir(old).conventions == PromptConventions(
        "as_written", "single_pass", "before", {}
    )


def test_conventions_are_checked():
    with pytest.raises(
        ConfigError, match="data.image_position: unknown value 'middle'; allowed: before, after"
    ):
        PromptConventions(image_position="middle")
    from lmm.data.datamodule import LMMDataModule

    with pytest.raises(ConfigError, match="data.image_position"):
        LMMDataModule(image_position="left")
    assert PromptConventions().question_turn("Q", 2) == "<image>\n<image>\nQ"
    assert PromptConventions(image_position="after").question_turn("Q", 2) == "Q\n<image>\n<image>"
    assert PromptConventions(image_position="after").question_turn("<image> Q", 1) == "<image> Q"


def test_predict_appends_the_benchmarks_answer_suffix_once(after_dir):
    ckpt = load_checkpoint_dir(after_dir)
    predictor = Predictor.from_checkpoint(ckpt)
    suffix = LLAVA_ANSWER_SUFFIXES["pope"]
    questions = [
        {"question_id": 1, "text": "Is there a dog?"},
        {"question_id": 2, "text": "Is there a cat?" + suffix},
    ]
    records = answer_questions(predictor, questions, Path("."), "m", answer_suffix="pope")
    assert [r["prompt"] for r in records] == [
        "Is there a dog?" + suffix,
        "Is there a cat?" + suffix,
    ]
    plain = answer_questions(predictor, questions[:1], Path("."), "m", answer_suffix=None)
    assert plain[0]["prompt"] == "Is there a dog?"
    assert answer_questions(predictor, questions[:1], Path("."), "m", answer_suffix="vqav2")[0][
        "prompt"
    ].endswith(suffix)


def test_predict_refuses_an_answer_suffix_the_checkpoint_does_not_record(
    after_dir, tmp_path, capsys
):
    from lmm.commands.predict import main

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "text": "Is there a dog?"}) + "\n")
    args = [
        "--ckpt",
        str(after_dir),
        "--questions",
        str(questions),
        "--answers",
        str(tmp_path / "a.jsonl"),
    ]
    assert main([*args, "--answer-suffix", "nocaps"]) == 2
    assert "records answer suffixes for: gqa, mmbench, mme, pope" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_chat_takes_its_max_length_from_the_checkpoint(
    lmm_model, tiny_models, tmp_path, monkeypatch
):
    """As predict does (the LM's context is 256 tokens here; the checkpoint says 40)."""
    import lmm.commands.chat as chat_command

    out = _save(lmm_model, tiny_models, tmp_path / "ckpt", PromptConventions(), max_length=40)
    lengths: list[int] = []
    monkeypatch.setattr(
        chat_command,
        "chat_loop",
        lambda predictor, *a, **k: lengths.append(predictor.encoder.max_length),
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat_command.main(["--ckpt", str(out)]) == 0
    assert chat_command.main(["--ckpt", str(out), "--max-length", "99"]) == 0
    assert lengths == [40, 99]


# -- the lmms-eval entry point ---------------------------------------------------------------------


def _fake_lmms_eval(monkeypatch, single):
    """lmms_eval modules with the behaviour of v0.7.2's ``lmms_eval/__main__.py``: ``cli_evaluate``
    calls the module's ``cli_evaluate_single`` per configuration, prints any exception and
    returns normally (unless --verbosity DEBUG)."""
    main_module = types.ModuleType("lmms_eval.__main__")

    def cli_evaluate(args=None):
        args = SimpleNamespace(tasks="pope" if "--tasks" in sys.argv else None, verbosity="INFO")
        try:
            main_module.cli_evaluate_single(args)
        except Exception as err:  # as lmms-eval: logged, not raised
            print(f"Error during evaluation: {err}")

    main_module.cli_evaluate = cli_evaluate
    main_module.cli_evaluate_single = single
    models = types.ModuleType("lmms_eval.models")
    models.MODEL_REGISTRY_V2 = SimpleNamespace(register_manifest=lambda manifest, overwrite: None)
    registry_v2 = types.ModuleType("lmms_eval.models.registry_v2")
    registry_v2.ModelManifest = lambda **kwargs: kwargs
    package = types.ModuleType("lmms_eval")
    for name, module in {
        "lmms_eval": package,
        "lmms_eval.__main__": main_module,
        "lmms_eval.models": models,
        "lmms_eval.models.registry_v2": registry_v2,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return main_module


def test_lmms_eval_entry_point_exits_non_zero_when_the_evaluation_fails(monkeypatch, capsys):
    from lmm.eval.lmms_eval_model import main

    def fails(args):
        raise RuntimeError("dataset not found")

    module = _fake_lmms_eval(monkeypatch, fails)
    assert main(["--model", "lmm", "--tasks", "pope"]) == 1
    assert "RuntimeError: dataset not found" in capsys.readouterr().err
    assert module.cli_evaluate_single is fails  # put back

    _fake_lmms_eval(monkeypatch, lambda args: (None, None))
    assert main(["--model", "lmm", "--tasks", "pope"]) == 1  # rank 0 without results

    def no_tasks(args):
        sys.exit()  # lmms-eval's "Need to specify task to evaluate." path

    _fake_lmms_eval(monkeypatch, no_tasks)
    assert main(["--model", "lmm"]) == 1
    assert "no --tasks given" in capsys.readouterr().err

    _fake_lmms_eval(monkeypatch, lambda args: ({"results": {"pope": {}}}, []))
    assert main(["--model", "lmm", "--tasks", "pope"]) == 0
