"""AUC-ROC, POPE with likelihood-scored records, MMStar and SEED-Bench-IMG, on hand-made
records in the public formats, with hand-computed expected values."""

from __future__ import annotations

import json
import random

import pytest

from lmm.commands.score import main as score_main
from lmm.eval import mmstar, seedbench
from lmm.eval.choices import option_letters
from lmm.eval.ranking import auc_roc


def _pairwise_auc(labels, scores) -> float:
    """The definition: P(positive scores above negative), ties 1/2, over all pairs."""
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_roc_hand_computed():
    # Pairs (pos, neg): (.9,.6) (.9,.1) (.4,.6) (.4,.1) -> 3 of 4 ordered right.
    assert auc_roc([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1]) == 0.75
    assert auc_roc([True, False], [0.5, 0.5]) == 0.5  # a tie is half a win
    # pos .8, .5 / neg .5, .3, .8: 1 + 1 + .5 + .5 + 1 + 0 = 4 of 6.
    assert auc_roc([1, 1, 0, 0, 0], [0.8, 0.5, 0.5, 0.3, 0.8]) == pytest.approx(4 / 6)
    assert auc_roc([1, 0, 1], [0.1, 0.9, 0.2]) == 0.0
    assert auc_roc([1, 1], [0.1, 0.2]) is None and auc_roc([0], [0.3]) is None
    rng = random.Random(0)
    for _ in range(20):
        labels = [rng.random() < 0.4 for _ in range(40)] + [True, False]
        scores = [round(rng.random(), 1) for _ in labels]  # many ties
        assert auc_roc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))


def test_pope_auc_from_likelihood_records(tmp_path, capsys):
    # Two splits; P(yes) per question. random: .75 as above; popular: one tie -> .5;
    # pooled (vlm-evaluation pools the splits): yes .9 .4 .3 / no .6 .1 .3 -> 6.5 of 9.
    rows = {
        "random": [("yes", 0.9), ("no", 0.6), ("yes", 0.4), ("no", 0.1)],
        "popular": [("yes", 0.3), ("no", 0.3)],
    }
    preds = []
    for split, items in rows.items():
        lines = [
            json.dumps({"question_id": i, "image": "x.jpg", "text": "q?", "label": y})
            for i, (y, _) in enumerate(items)
        ]
        (tmp_path / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
        for i, (_, p) in enumerate(items):
            text = "Yes" if p > 0.5 else "No"  # the argmax candidate
            preds.append(
                {
                    "question_id": i,
                    "category": split,
                    "text": text,
                    "probs": {"Yes": p, "No": 1 - p},
                }
            )
    pred_file = tmp_path / "answers.jsonl"
    pred_file.write_text("".join(json.dumps(p) + "\n" for p in preds))
    argv = ["pope", "--annotations", str(tmp_path), "--predictions", str(pred_file)]
    assert score_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["splits"]["random"]["auc_roc"] == 0.75
    assert out["splits"]["popular"]["auc_roc"] == 0.5
    assert out["auc_roc"] == pytest.approx(6.5 / 9)
    # Accuracy at the argmax: random 2 of 4 (.6 says yes to a no, .4 no to a yes), popular 1 of 2.
    assert (
        out["splits"]["random"]["accuracy"] == 0.5 and out["splits"]["popular"]["accuracy"] == 0.5
    )


def test_option_letters_in_the_public_prompt_formats():
    mmstar_q = (
        "Which option describe the object relationship in the image correctly?\nOptions: "
        "A: The suitcase is on the book., B: The suitcase is beneath the cat., "
        "C: The suitcase is beneath the bed., D: The suitcase is beneath the book."
    )
    assert option_letters(mmstar_q) == ("A", "B", "C", "D")
    llava = "What is it?\nA. a cat\nB. a dog\nC. a bird\nAnswer with the option's letter."
    assert option_letters(llava) == ("A", "B", "C")
    assert option_letters("Pick one: (A) red (B) blue") == ("A", "B")
    with pytest.raises(ValueError, match="--candidates"):
        option_letters("Is there a dog? A dog.")


MMSTAR_ROWS = [  # index, answer, category, l2_category, prediction
    (0, "A", "coarse perception", "image emotion", "A"),
    (1, "B", "coarse perception", "image emotion", "(B) the cat"),
    (2, "C", "math", "geometry", "Option C"),
    (3, "D", "math", "geometry", "The answer is B"),
    (4, "A", "math", "statistical reasoning", ""),
    (5, "B", "math", "statistical reasoning", None),  # no prediction
    (6, "C", "coarse perception", "image emotion", "c"),
]


def test_mmstar_official_rule_and_aggregates(tmp_path, capsys):
    header = "index\tquestion\tanswer\tcategory\tl2_category\timage\n"
    body = "".join(
        f"{i}\tQ{i}?\\nOptions: A: a, B: b, C: c, D: d\t{a}\t{c}\t{l2}\tiVBORw0KGgo=\n"
        for i, a, c, l2, _ in MMSTAR_ROWS
    )
    tsv = tmp_path / "MMStar.tsv"
    tsv.write_text(header + body)
    preds = tmp_path / "answers.jsonl"
    preds.write_text(
        "".join(
            json.dumps({"question_id": i, "text": p}) + "\n"
            for i, *_, p in MMSTAR_ROWS
            if p is not None
        )
        + json.dumps({"question_id": 99, "text": "A"})
        + "\n"
    )
    assert score_main(["mmstar", "--annotations", str(tsv), "--predictions", str(preds)]) == 0
    out = json.loads(capsys.readouterr().out)
    # Right: 0 (A), 1 "(b", 2 "option c", 6 "c" (lower-cased); wrong: 3, 4 (empty), 5 (missing).
    assert out["accuracy"] == pytest.approx(4 / 7) and out["correct"] == 4
    assert out["per_category"] == {"coarse perception": 1.0, "math": 0.25}
    assert out["per_l2_category"] == {
        "geometry": 0.5,
        "image emotion": 1.0,
        "statistical reasoning": 0.0,
    }
    assert out["macro_accuracy"] == pytest.approx(0.5)  # lmms-eval: mean of the l2 means
    assert (out["missing"], out["unknown"]) == (1, 1)
    # The official check, case by case (MMStar eval/vlmeval/evaluate/mmstar.py, MMStar_eval).
    assert mmstar.is_right("the answer is d.", "D") and not mmstar.is_right("D", "A")
    assert not mmstar.is_right("option", "A") and not mmstar.is_right("", "A")


def test_seedbench_img_questions_and_dimensions(tmp_path, capsys):
    doc = {
        "question_type": {
            "Scene Understanding": 1,
            "Instance Identity": 2,
            "Text Understanding": 9,
            "Action Recognition": 10,
        },
        "questions": [
            {"question_id": "101", "question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
             "choice_d": "d", "answer": "A", "data_id": "1.jpg", "data_type": "image", "question_type_id": 1},
            {"question_id": "102", "question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
             "choice_d": "d", "answer": "B", "data_id": "2.jpg", "data_type": "image", "question_type_id": 1},
            {"question_id": "103", "question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
             "choice_d": "d", "answer": "C", "data_id": "3.jpg", "data_type": "image", "question_type_id": 2},
            {"question_id": "104", "question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
             "choice_d": "d", "answer": "D", "data_id": "4.jpg", "data_type": "image", "question_type_id": 9},
            {"question_id": "v1", "question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
             "choice_d": "d", "answer": "A", "data_id": "v.mp4", "data_type": "video", "question_type_id": 10},
        ],
    }  # fmt: skip
    ann = tmp_path / "SEED-Bench.json"
    ann.write_text(json.dumps(doc))
    preds = [
        {"question_id": "101", "text": "A"},
        {"question_id": "102", "text": " B. a dog"},  # stripped, first character
        {"question_id": "103", "text": "c"},  # lmms-eval compares the letter as written
        {"question_id": "v1", "text": "A"},  # a video question: ignored
        {"question_id": "999", "text": "A"},
    ]
    pred_file = tmp_path / "answers.jsonl"
    pred_file.write_text("".join(json.dumps(p) + "\n" for p in preds))
    argv = ["seedbench_img", "--annotations", str(ann), "--predictions", str(pred_file)]
    assert score_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == 0.5 and out["n"] == 4
    assert out["per_dimension"] == {
        "Scene Understanding": 1.0,
        "Instance Identity": 0.0,
        "Text Understanding": 0.0,
    }
    assert (out["ignored_video"], out["unknown"], out["missing"]) == (1, 1, 1)
    # JSON lines without data_type (dimension ids only) select the same image questions.
    rows = tmp_path / "seed.jsonl"
    rows.write_text(
        "".join(
            json.dumps({k: v for k, v in q.items() if k != "data_type"}) + "\n"
            for q in doc["questions"]
        )
    )
    ann2 = seedbench.load_annotations(rows)
    assert [q.question_id for q in ann2.questions] == ["101", "102", "103", "104"]
    assert ann2.video_ids == {"v1"}
