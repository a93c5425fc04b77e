"""``chat`` (multi-turn, fake IO and a piped subprocess), ``predict`` (LLaVA question/answer
JSONL) and the command registration."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPEC
from PIL import Image

from lmm.__main__ import main as lmm_main
from lmm.checkpoints.directory import load_checkpoint_dir, save_checkpoint_dir
from lmm.commands.predict import main as predict_main
from lmm.data.templates import get_template
from lmm.eval.predictions import read_predictions
from lmm.inference.chat import chat_loop
from lmm.inference.ordering import sort_by_order
from lmm.inference.predictor import Predictor, answer_questions
from lmm.model.language import LanguageConfig
from lmm.model.lmm import GenerationConfig
from lmm.model.towers import VisionConfig

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = replace(get_template("vicuna"), system="")


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (
        (torch.rand(TINY_SPEC.image_size, TINY_SPEC.image_size, 3, generator=g) * 255)
        .to(torch.uint8)
        .numpy()
    )
    return Image.fromarray(arr, "RGB")


@pytest.fixture(scope="module")
def ckpt_dir(lmm_model, tiny_models, tmp_path_factory) -> Path:
    vision = VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1)
    llm = LanguageConfig(name_or_path=str(tiny_models["llm"]))
    return save_checkpoint_dir(
        lmm_model,
        tmp_path_factory.mktemp("chat") / "ckpt",
        vision=vision,
        llm=llm,
        connector="mlp2x_gelu",
        template=TEMPLATE,
        max_length=256,
        generation=GenerationConfig(max_new_tokens=6),
    )


@pytest.fixture(scope="module")
def ckpt(ckpt_dir):
    return load_checkpoint_dir(ckpt_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    out = {}
    for name, seed in [("a.png", 1), ("b.png", 2), ("c.png", 3)]:
        _image(seed).save(folder / name)
        out[name] = folder / name
    return out


def _reference(
    predictor: Predictor, conversation: list[tuple[str, str | None]], image: Image.Image
) -> list[str]:
    """Answers to a conversation, turn by turn, built directly from the LLaVA schema."""
    turns, answers = [], []
    for k, (question, _) in enumerate(conversation):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
        answer = predictor.generate([predictor.encode(turns, [image])])[0]
        turns.append({"from": "gpt", "value": answer})
        answers.append(answer)
    return answers


# -- chat ----------------------------------------------------------------------------------------


def test_chat_keeps_history_switches_image_and_resets(ckpt, images):
    predictor = Predictor.from_checkpoint(ckpt, batch_size=1)
    a, b = Image.open(images["a.png"]).convert("RGB"), Image.open(images["b.png"]).convert("RGB")
    script = "\n".join([
        "What color is the circle?", "And the shape?",         # two turns about a.png
        f"/image {images['b.png']}", "Describe the image.",   # new image, new conversation
        "/reset", "How many shapes are there?",               # same image, history cleared
        "/image /no/such.png", "/bogus", "", "Where is it?",   # errors keep the conversation
    ]) + "\n"  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    assert chat_loop(predictor, a, io.StringIO(script), out, err) == 5
    expected = _reference(
        predictor, [("What color is the circle?", None), ("And the shape?", None)], a
    )
    expected += _reference(predictor, [("Describe the image.", None)], b)
    expected += _reference(
        predictor, [("How many shapes are there?", None), ("Where is it?", None)], b
    )
    assert out.getvalue() == "".join(
        f"{answer}\n" for answer in expected
    )  # one answer per turn, in order
    # The second turn really saw the first (history is kept): without it the answer differs
    # for at least one of the multi-turn answers.
    alone = [
        predictor.generate([predictor.encode_question(q, [img])])[0]
        for q, img in [("And the shape?", a), ("Where is it?", b)]
    ]
    assert alone != [expected[1], expected[4]]
    notices = err.getvalue()
    assert "new conversation" in notices and "conversation reset" in notices
    assert "/no/such.png' does not exist" in notices and "unknown command '/bogus'" in notices


def test_chat_quits_and_reports_overlong(ckpt, images):
    predictor = Predictor.from_checkpoint(ckpt, batch_size=1)
    predictor.encoder.max_length = 30  # the image alone takes 16 tokens
    out, err = io.StringIO(), io.StringIO()
    long_question = "Describe " + "the image " * 20
    n = chat_loop(
        predictor, _image(1), io.StringIO(f"{long_question}\nHi\n/quit\nNever read\n"), out, err
    )
    assert n == 1 and out.getvalue().count("\n") == 1 + predictor.generate(
        [predictor.encode_question("Hi", [_image(1)])]
    )[0].count("\n")
    assert "cannot answer" in err.getvalue() and "max_length=30" in err.getvalue()


def test_chat_command_with_piped_stdin(ckpt, ckpt_dir, images):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmm",
            "chat",
            "--ckpt",
            str(ckpt_dir),
            "--image",
            str(images["c.png"]),
        ],
        input="What color is the circle?\nAnd the shape?\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictor = Predictor.from_checkpoint(ckpt, batch_size=1)
    c = Image.open(images["c.png"]).convert("RGB")
    expected = _reference(
        predictor, [("What color is the circle?", None), ("And the shape?", None)], c
    )
    assert proc.stdout == "".join(f"{answer}\n" for answer in expected)


def test_chat_errors_name_the_problem(tmp_path, capsys):
    assert lmm_main(["chat", "--ckpt", str(tmp_path), "--image", str(tmp_path / "x.png")]) == 2
    assert "x.png' does not exist" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert lmm_main(["chat", "--ckpt", str(tmp_path), "--image", str(tmp_path / "x.png")]) == 2
    assert "is not an lmm checkpoint directory" in capsys.readouterr().err


# -- predict -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def questions(images, tmp_path_factory) -> Path:
    rows = [
        {
            "question_id": 7,
            "image": "a.png",
            "text": "Is there a circle in the image?",
            "category": "x",
        },
        {
            "question_id": "q-2",
            "image": "b.png",
            "text": "What color is the square? Answer the question using a single word.",
        },
        {"question_id": 3, "image": "missing.png", "text": "Anything?"},
        {"question_id": 4, "image": "c.png", "text": "How many shapes?"},
        {"question_id": 5, "text": "A question without an image."},
    ]
    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_predict_writes_llava_answers_in_question_order(
    ckpt, ckpt_dir, images, questions, tmp_path, capsys
):
    answers = tmp_path / "answers.jsonl"
    assert (
        predict_main(
            [
                "--ckpt",
                str(ckpt_dir),
                "--questions",
                str(questions),
                "--image-folder",
                str(images["a.png"].parent),
                "--answers",
                str(answers),
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert "Wrote 5 answers" in capsys.readouterr().out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [7, "q-2", 3, 4, 5]
    for r in rows:
        assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(r)
        assert r["model_id"] == "ckpt" and len(r["answer_id"]) == 22
    assert len({r["answer_id"] for r in rows}) == 5
    assert rows[2]["text"] == "" and "missing.png' does not exist" in rows[2]["error"]
    # Batched answers equal one-at-a-time answers with the same prompts.
    predictor = Predictor.from_checkpoint(ckpt, batch_size=1)
    qs = [json.loads(line) for line in questions.read_text().splitlines()]
    for q, r in zip(qs, rows):
        assert r["prompt"] == q["text"]
        if "error" in r:
            continue
        imgs = [Image.open(images[q["image"]]).convert("RGB")] if "image" in q else []
        assert r["text"] == predictor.generate([predictor.encode_question(q["text"], imgs)])[0], q
    # lmm's scorers read the file as LLaVA's scripts write it.
    parsed = read_predictions(answers)
    assert len(parsed.records) == 5 and not parsed.malformed


def test_predict_split_over_two_ranks_comes_back_in_order(ckpt, images, questions):
    predictor = Predictor.from_checkpoint(ckpt, batch_size=2)
    qs = [json.loads(line) for line in questions.read_text().splitlines()]
    folder = images["a.png"].parent
    single = answer_questions(predictor, qs, folder, "m")
    ranks = [answer_questions(predictor, qs, folder, "m", rank=r, world_size=2) for r in range(2)]
    assert [r["order"] for r in ranks[0]] == [0, 2, 4] and [r["order"] for r in ranks[1]] == [1, 3]
    merged = sort_by_order([ranks[1], ranks[0]])
    strip = lambda rs: [(r["question_id"], r["text"]) for r in rs]  # noqa: E731
    assert strip(merged) == strip(sort_by_order([single]))


def test_predict_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "text": "ok"}\n{"text": "no id"}\n')
    assert (
        predict_main(
            ["--ckpt", str(tmp_path), "--questions", str(bad), "--answers", str(tmp_path / "a")]
        )
        == 2
    )
    assert f"{bad}:2: expected an object with 'question_id'" in capsys.readouterr().err


# -- registration --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["chat", "predict", "export", "checkpoint", "import"])
def test_commands_are_registered_with_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        lmm_main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m lmm {command}" in out and ("--ckpt" in out or "--out" in out)
    with pytest.raises(SystemExit):
        lmm_main(["--help"])
    assert command in capsys.readouterr().out


def test_predict_scores_a_pope_split_to_json_and_tensorboard(ckpt_dir, images, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmm.commands.score import main as score_main

    # A POPE question file in the official format doubles as annotations (label per question).
    rows = [
        {"question_id": i, "image": img, "text": f"Is there a {obj} in the image?", "label": label}
        for i, (img, obj, label) in enumerate(
            [
                ("a.png", "circle", "yes"),
                ("b.png", "square", "no"),
                ("c.png", "star", "yes"),
                ("a.png", "cross", "no"),
            ]
        )
    ]
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers, tb = tmp_path / "out" / "answers.jsonl", tmp_path / "tb"
    argv = [
        "--ckpt",
        str(ckpt_dir),
        "--questions",
        str(pope),
        "--image-folder",
        str(images["a.png"].parent),
        "--answers",
        str(answers),
        "--benchmark",
        "pope",
        "--annotations",
        str(pope),
        "--tensorboard",
        str(tb),
    ]
    assert predict_main(argv) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "out" / "answers.metrics.json").read_text())
    # The same as scoring the answer file afterwards with `python -m lmm score`.
    assert score_main(["pope", "--annotations", str(pope), "--predictions", str(answers)]) == 0
    assert json.loads(capsys.readouterr().out) == written
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"pope/mean_f1", "pope/malformed"} <= set(tags) and any(t.endswith("/f1") for t in tags)
    for tag in tags:
        *path, leaf = tag.split("/")[1:]
        value = written
        for key in path:
            value = value[key]
        assert acc.Scalars(tag)[0].value == pytest.approx(value[leaf])


def test_predict_scoring_options_are_checked_before_generating(
    ckpt_dir, questions, tmp_path, capsys
):
    with pytest.raises(SystemExit):
        predict_main(
            [
                "--ckpt",
                str(ckpt_dir),
                "--questions",
                str(questions),
                "--answers",
                str(tmp_path / "a"),
                "--benchmark",
                "pope",
            ]
        )
    assert "--benchmark and --annotations go together" in capsys.readouterr().err
    assert (
        predict_main(
            [
                "--ckpt",
                str(ckpt_dir),
                "--questions",
                str(questions),
                "--answers",
                str(tmp_path / "a"),
                "--benchmark",
                "popee",
                "--annotations",
                str(questions),
            ]
        )
        == 2
    )
    assert "known:" in capsys.readouterr().err and not (tmp_path / "a").exists()
