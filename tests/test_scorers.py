"""Hand-computed checks for every benchmark scorer in lmm.eval (pure Python, fast)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmm.eval import gqa, mmbench, mme, pope, scienceqa, short_answer, vqa
from lmm.eval.normalize import normalize_answer
from lmm.eval.predictions import parse_prediction_lines
from lmm.eval.registry import UnknownComponentError, benchmark_names, get_benchmark

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def recs(*items):
    """Prediction records as the JSONL reader returns them: (id, text[, extra fields])."""
    out = []
    for item in items:
        extra = item[2] if len(item) > 2 else {}
        out.append({"question_id": item[0], "text": item[1], **extra})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- normalize
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes, there is.", "yes there is"),  # comma deleted, final period deleted
        ("Two", "2"),  # number word -> digit
        ("a dog", "dog"),  # article dropped
        ("The answer is (B).", "answer is b"),
        ("3.5", "3.5"),  # period before a digit is kept
        ("1,000", "1000"),
        ("dont", "don't"),  # contraction restored
        ("red-ish", "red ish"),  # '-' not touching a space -> space
        ("ten dogs.", "10 dogs"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# --------------------------------------------------------------------------- POPE
@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes, there is.", "yes"),
        ("No.", "no"),
        ("Not really", "yes"),  # official word list is {No, no, not}: "Not" is not in it
        ("There is no dog in the image.", "no"),
        ("no, it is not", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # case-sensitive word match, as in the reference
    ],
)
def test_pope_parse(text, parsed):
    assert pope.parse_yes_no(text) == parsed


def test_pope_metrics_hand_computed():
    preds = [
        "Yes, there is.",
        "No.",
        "Not really",
        "There is no cat in the image.",
        "yes",
        "No",
        "yes",
    ]
    labels = ["yes", "no", "no", "yes", "yes", "no", "no"]
    # parsed: yes no yes no yes no yes
    # TP (yes,yes) x2 [0,4]; TN (no,no) x2 [1,5]; FP (yes,no) x2 [2,6]; FN (no,yes) x1 [3]
    m = pope.pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 2, 1)
    assert m["n"] == 7
    assert m["accuracy"] == pytest.approx(4 / 7)  # (2+2)/7
    assert m["precision"] == pytest.approx(0.5)  # 2/(2+2)
    assert m["recall"] == pytest.approx(2 / 3)  # 2/(2+1)
    assert m["f1"] == pytest.approx(4 / 7)  # 2*.5*(2/3)/(.5+2/3) = (2/3)/(7/6)
    assert m["yes_ratio"] == pytest.approx(4 / 7)  # 4 of 7 parsed yes
    assert m["missing"] == 0


def test_pope_metrics_missing_and_zero_denominators():
    # None/yes -> FN, None/no -> FP, "yes"/no -> FP: TP=0 so precision=recall=f1=0 (not NaN)
    m = pope.pope_metrics([None, None, "yes"], ["yes", "no", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 2, 0, 1)
    assert m["accuracy"] == 0.0 and m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["yes_ratio"] == 1.0  # over the one existing prediction
    assert m["missing"] == 2


def test_pope_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        pope.pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        pope.pope_metrics(["yes", "no"], ["yes"])


def test_pope_evaluate_two_split_files(tmp_path):
    for split in ("random", "adversarial"):
        write_jsonl(
            tmp_path / f"coco_pope_{split}.json",
            [
                {
                    "question_id": 1,
                    "image": "a.jpg",
                    "text": "Is there a dog in the image?",
                    "label": "yes",
                },
                {
                    "question_id": 2,
                    "image": "a.jpg",
                    "text": "Is there a cat in the image?",
                    "label": "no",
                },
            ],
        )
    questions = pope.load_annotations(tmp_path)
    assert [q.split for q in questions] == ["random", "random", "adversarial", "adversarial"]
    out = pope.evaluate(
        questions,
        recs(
            (1, "Yes", {"category": "random"}),
            (2, "No", {"category": "random"}),
            (1, "No", {"category": "adversarial"}),
            (2, "No", {"category": "adversarial"}),
            (1, "Yes"),  # no category and id 1 exists in both splits -> ambiguous/unknown
        ),
    )
    assert out["splits"]["random"]["f1"] == 1.0 and out["splits"]["random"]["accuracy"] == 1.0
    # adversarial: FN + TN -> accuracy 1/2, precision 0/0 -> 0, recall 0/1, f1 0
    assert out["splits"]["adversarial"]["accuracy"] == 0.5
    assert out["splits"]["adversarial"]["f1"] == 0.0
    assert out["mean_f1"] == 0.5  # (1 + 0) / 2
    assert out["mean_accuracy"] == 0.75  # (1 + 0.5) / 2
    assert (out["n"], out["missing"], out["unknown"], out["ambiguous"]) == (4, 0, 1, 1)


def test_pope_single_file_ids_resolve_without_category(tmp_path):
    path = write_jsonl(
        tmp_path / "coco_pope_popular.json",
        [
            {"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "q", "label": "no"},
        ],
    )
    out = pope.evaluate(pope.load_annotations(path), recs((1, "Yes, there is."), (3, "no")))
    # q1 TP, q2 missing -> wrong -> FP: accuracy 1/2, precision 1/2, recall 1/1
    assert out["splits"]["popular"]["accuracy"] == 0.5
    assert out["splits"]["popular"]["precision"] == 0.5
    assert out["splits"]["popular"]["recall"] == 1.0
    assert (out["missing"], out["unknown"]) == (1, 1)


# --------------------------------------------------------------------------- VQAv2 / TextVQA
def test_vqa_accuracy_hand_computed():
    # "two" -> "2"; 3 of 10 humans said "2".  Leaving out one of the three "2"s leaves
    # 2 matches -> 2/3 (x3 = 2); leaving out a "3" leaves 3 matches -> 1 (x7 = 7): 9/10
    assert vqa.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # one match: own subset 0, the nine others 1/3 each -> 3/10
    assert vqa.vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    # two matches: 2 subsets with 1 match (1/3 each), 8 with 2 (2/3 each) -> (2/3+16/3)/10 = 0.6
    assert vqa.vqa_accuracy("Red.", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert vqa.vqa_accuracy("a dog", ["dog"] * 10) == 1.0  # article dropped
    assert vqa.vqa_accuracy("Yes, there is.", ["yes"] * 10) == 0.0  # "yes there is" != "yes"


def test_vqav2_evaluate(tmp_path):
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "question_id": 10,
                        "image_id": 1,
                        "answer_type": "number",
                        "question_type": "how many",
                        "answers": [
                            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(["2"] * 3 + ["3"] * 7)
                        ],
                    },
                    {
                        "question_id": 11,
                        "image_id": 1,
                        "answer_type": "other",
                        "question_type": "what",
                        "answers": [{"answer": "cat", "answer_id": i + 1} for i in range(10)],
                    },
                ]
            }
        )
    )
    out = vqa.evaluate(vqa.load_annotations(path), recs((10, "two"), (12, "cat")))
    assert out["accuracy"] == pytest.approx(0.45)  # (0.9 + 0 [missing]) / 2
    assert out["accuracy_per_answer_type"] == pytest.approx({"number": 0.9, "other": 0.0})
    assert (out["n"], out["missing"], out["unknown"]) == (2, 1, 1)


def test_textvqa_prompt_and_llava_style_matching(tmp_path):
    assert vqa.textvqa_prompt("What brand?", ["nike", "5"]) == (
        "What brand?\nReference OCR token: nike, 5\n" + SHORT
    )
    assert vqa.textvqa_prompt("What brand?", []) == "What brand?\n" + SHORT
    assert (
        vqa.textvqa_prompt("Q?", ["a", "b", "c"], max_tokens=2)
        == "Q?\nReference OCR token: a, b\n" + SHORT
    )
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(
        json.dumps(
            {
                "dataset_name": "textvqa",
                "data": [
                    {
                        "question_id": 100,
                        "image_id": "img1",
                        "question": "what brand?",
                        "answers": ["nike"] * 10,
                    },
                    {
                        "question_id": 101,
                        "image_id": "img1",
                        "question": "what number?",
                        "answers": ["5"] * 10,
                    },
                ],
            }
        )
    )
    # LLaVA writes the image id as question_id; the question comes from the prompt.
    prompt = vqa.textvqa_prompt("What number?", ["5", "nike"])
    out = vqa.evaluate(vqa.load_annotations(path), recs(("img1", "five", {"prompt": prompt})))
    assert out["accuracy"] == 0.5  # q101 "five"->"5" scores 1, q100 missing scores 0
    assert (out["missing"], out["unknown"]) == (1, 0)


# --------------------------------------------------------------------------- GQA
def test_gqa_normalize_and_evaluate(tmp_path):
    assert gqa.gqa_normalize(" Traffic light. ") == "traffic light"
    assert gqa.gqa_normalize("a dog") == "a dog"  # no article removal in GQA
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(
        json.dumps(
            {
                "q1": {
                    "answer": "yes",
                    "isBalanced": True,
                    "types": {"structural": "verify", "semantic": "rel"},
                },
                "q2": {
                    "answer": "traffic light",
                    "isBalanced": True,
                    "types": {"structural": "query", "semantic": "attr"},
                },
                "q3": {
                    "answer": "dog",
                    "isBalanced": True,
                    "types": {"structural": "query", "semantic": "obj"},
                },
                "q4": {
                    "answer": "no",
                    "isBalanced": False,
                    "types": {"structural": "verify", "semantic": "rel"},
                },
            }
        )
    )
    out = gqa.evaluate(
        gqa.load_annotations(path), recs(("q1", "Yes."), ("q2", "Traffic light"), ("q3", "a dog"))
    )
    assert out["accuracy"] == pytest.approx(2 / 3)  # q1, q2 right; "a dog" != "dog"
    assert out["accuracy_binary"] == 1.0  # q1
    assert out["accuracy_open"] == 0.5  # q2 right, q3 wrong
    assert out["excluded_unbalanced"] == 1 and out["n"] == 3 and out["missing"] == 0


# --------------------------------------------------------------------------- ScienceQA
@pytest.mark.parametrize(
    "text, letter",
    [
        ("A", "A"),
        ("b", "B"),
        ("(C)", "C"),
        ("C.", "C"),
        ("B. a dog", "B"),
        ("The answer is B.", "B"),
        ("The answer is (B).", "B"),
        ("Answer: D", "D"),
        ("A dog", None),
        ("I am not sure", None),
        ("E", None),  # E is not among 4 choices
    ],
)
def test_extract_letter(text, letter):
    assert scienceqa.extract_letter(text, 4) == letter


def test_scienceqa_img_evaluate(tmp_path):
    def prob(answer, image, split="test"):
        return {
            "question": "q",
            "choices": ["x", "y", "z"],
            "answer": answer,
            "image": image,
            "split": split,
        }

    (tmp_path / "problems.json").write_text(
        json.dumps(
            {
                "p1": prob(1, "image.png"),
                "p2": prob(0, "image.png"),
                "p3": prob(2, "image.png"),
                "p4": prob(0, None),
                "p5": prob(0, "image.png", split="val"),
                "p7": prob(0, "image.png"),
            }
        )
    )
    ann = scienceqa.load_annotations(tmp_path)  # directory, default split "test"
    out = scienceqa.evaluate(
        ann,
        recs(
            ("p1", "The answer is B."),  # right
            ("p2", "(C)"),  # wrong (answer A)
            ("p3", "I think the third one"),  # unparsed -> wrong
            ("p4", "A"),  # text-only problem: ignored
            ("p6", "A"),  # unknown id
        ),
    )  # p7 missing -> wrong; p5 is in "val"
    assert out["n"] == 4 and out["correct"] == 1
    assert out["accuracy"] == 0.25  # 1 / 4
    assert (out["unparsed"], out["missing"], out["unknown"], out["ignored_non_image"]) == (
        1,
        1,
        1,
        1,
    )


# --------------------------------------------------------------------------- MME
@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("Not really", "no"),
        ("Yes, there is.", "yes"),
        ("None", "no"),
        ("I think so", "other"),
    ],
)
def test_mme_parse(text, parsed):
    assert mme.parse_yes_no(text) == parsed


def _mme_records(tmp_path):
    def q(s):
        return f"{s} Please answer yes or no."

    rows = [
        ("existence/img1.jpg", q("Is there a dog?"), "Yes"),
        ("existence/img1.jpg", q("Is there a cat?"), "No"),
        ("existence/img2.jpg", q("Is there a car?"), "Yes"),
        ("existence/img2.jpg", q("Is there a bus?"), "No"),
        ("count/img3.jpg", q("Are there two dogs?"), "Yes"),
        ("count/img3.jpg", q("Are there three dogs?"), "No"),
        ("code_reasoning/img4.png", q("Does it print 5?"), "Yes"),
        ("code_reasoning/img4.png", q("Does it print 6?"), "No"),
    ]
    return rows, write_jsonl(
        tmp_path / "mme.jsonl",
        [{"question_id": i, "question": qq, "answer": a} for i, qq, a in rows],
    )


def test_mme_acc_plus_on_image_pairs(tmp_path):
    rows, path = _mme_records(tmp_path)
    questions = mme.load_annotations(path)
    answers = [
        "Yes",
        "No",  # img1 both right
        "Yes",
        "Yes",  # img2 second wrong
        "Not really",
        "no",  # img3 first wrong ("not " -> no)
        "I am unsure",
        None,
    ]  # img4: unparsable ("other") + missing
    records = []
    for (qid, question, _), text in zip(rows, answers):
        if text is None:
            continue
        # LLaVA prompt form; img3 predictions carry no prompt (matched by order).
        extra = (
            {} if "img3" in qid else {"prompt": question.replace("Please answer yes or no.", SHORT)}
        )
        records.append({"question_id": qid, "text": text, **extra})
    out = mme.evaluate(questions, records)
    ex = out["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"]) == (0.75, 0.5)  # 3/4 questions, 1/2 images
    assert ex["score"] == pytest.approx(125.0)  # (0.75 + 0.5) * 100
    assert out["subtasks"]["count"]["score"] == pytest.approx(50.0)  # (1/2 + 0/1) * 100
    assert out["perception_score"] == pytest.approx(175.0)  # 125 + 50
    assert out["cognition_score"] == 0.0  # code_reasoning: 0 + 0
    assert (out["n"], out["unparsed"], out["missing"], out["unknown"]) == (8, 1, 1, 0)
    assert "OCR" in out["missing_subtasks"] and "existence" not in out["missing_subtasks"]


def test_mme_release_directory_layout(tmp_path):
    qa = tmp_path / "existence" / "questions_answers_YN"
    qa.mkdir(parents=True)
    (qa / "000.txt").write_text(
        "Is there a dog? Please answer yes or no.\tYes\n"
        "Is there a cat? Please answer yes or no.\tNo\n"
    )
    flat = tmp_path / "OCR"
    flat.mkdir()
    (flat / "a.b.txt").write_text(
        "Is the word 'hi'? Please answer yes or no.\tNo\n"
        "Is the word 'ho'? Please answer yes or no.\tYes\n"
    )
    questions = mme.load_annotations(tmp_path)
    assert sorted({(q.subtask, q.image) for q in questions}) == [
        ("OCR", "a.b"),
        ("existence", "000"),
    ]
    out = mme.evaluate(
        questions,
        recs(
            ("OCR/a.b.jpg", "No", {"prompt": "Is the word 'hi'? Please answer yes or no."}),
            ("OCR/a.b.jpg", "Yes", {"prompt": "Is the word 'ho'?  Please answer yes or no."}),
        ),
    )
    assert out["subtasks"]["OCR"]["score"] == 200.0  # (1 + 1) * 100
    assert out["subtasks"]["existence"]["score"] == 0.0  # both missing
    assert out["perception_score"] == 200.0 and out["missing"] == 2


# --------------------------------------------------------------------------- MMBench
def _write_tsv(path: Path, rows):
    cols = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "l2-category",
        "split",
    ]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in cols})
    return path


def _circular_tsv(tmp_path):
    base = dict(
        question="What color is it?", category="color", **{"l2-category": "perception"}, split="dev"
    )
    logic = dict(question="Is it?", category="logic", **{"l2-category": "reasoning"}, split="dev")
    return _write_tsv(
        tmp_path / "mmbench_dev_en.tsv",
        [
            # question 5 and its three rotations (index + k * 1e6), answer always "red"
            {"index": 5, "A": "red", "B": "blue", "C": "green", "D": "pink", "answer": "A", **base},
            {
                "index": 1000005,
                "A": "blue",
                "B": "green",
                "C": "pink",
                "D": "red",
                "answer": "D",
                **base,
            },
            {
                "index": 2000005,
                "A": "green",
                "B": "pink",
                "C": "red",
                "D": "blue",
                "answer": "C",
                **base,
            },
            {
                "index": 3000005,
                "A": "pink",
                "B": "red",
                "C": "blue",
                "D": "green",
                "answer": "B",
                **base,
            },
            # question 7 (two options) and its rotation, answer always "no"
            {"index": 7, "A": "yes", "B": "no", "answer": "B", **logic},
            {"index": 1000007, "A": "no", "B": "yes", "answer": "A", **logic},
            # question 9, no rotated copies in the file
            {"index": 9, "A": "x", "B": "y", "C": "z", "answer": "C", **logic},
            # a test-split row without answer is skipped
            {"index": 11, "A": "x", "B": "y", "answer": "", **logic},
        ],
    )


def test_mmbench_circular_eval(tmp_path):
    ann = mmbench.load_annotations(_circular_tsv(tmp_path))
    assert ann.unlabelled == 1
    out = mmbench.evaluate(
        ann,
        recs(
            (5, "A"),
            (1000005, "(D)"),
            (2000005, "red"),
            (3000005, "The answer is B."),  # all right
            (7, "B"),
            (1000007, "B"),  # 2nd wrong
            (9, "I don't know"),  # unparsed
        ),
    )
    assert out["n"] == 3 and out["n_presentations"] == 7
    assert out["accuracy"] == pytest.approx(1 / 3)  # only question 5 right in every rotation
    assert out["vanilla_accuracy"] == pytest.approx(
        2 / 3
    )  # first presentations: 5 ok, 7 ok, 9 wrong
    assert out["per_category"] == {"color": 1.0, "logic": 0.0}
    assert (out["unparsed"], out["missing"], out["unknown"]) == (1, 0, 0)


def test_mmbench_missing_rotation_fails_question(tmp_path):
    ann = mmbench.load_annotations(_circular_tsv(tmp_path))
    out = mmbench.evaluate(
        ann, recs((5, "A"), (1000005, "D"), (2000005, "C"), (7, "B"), (1000007, "A"), (9, "C"))
    )
    # question 5 lacks its 3000005 rotation -> wrong; 7 and 9 right -> 2/3
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["missing"] == 1


def test_mmbench_llava_all_rounds(tmp_path):
    path = _write_tsv(
        tmp_path / "mmbench.tsv",
        [
            {
                "index": 11,
                "question": "Which animal?",
                "A": "cat",
                "B": "dog",
                "C": "bird",
                "answer": "B",
            },
            {"index": 12, "question": "Is it?", "A": "yes", "B": "no", "answer": "A"},
        ],
    )
    ann = mmbench.load_annotations(path)
    out = mmbench.evaluate(
        ann,
        [
            # row 11, answer "dog": round r shows options rotated left by r
            {
                "question_id": 11,
                "round_id": 0,
                "text": "B",
                "options": ["cat", "dog", "bird"],
                "option_char": ["A", "B", "C"],
            },
            {
                "question_id": 11,
                "round_id": 1,
                "text": "A",
                "options": ["dog", "bird", "cat"],
                "option_char": ["B", "C", "A"],
            },
            {
                "question_id": 11,
                "round_id": 2,
                "text": "The answer is C.",
                "options": ["bird", "cat", "dog"],
                "option_char": ["C", "A", "B"],
            },
            # row 12, answer "yes": round 1 shows [no, yes] (rotation inferred, no option_char),
            # so the right letter is B; "A" (= "no") is wrong
            {"question_id": 12, "round_id": 0, "text": "A"},
            {"question_id": 12, "round_id": 1, "text": "A"},
        ],
    )
    assert out["all_rounds"] is True and out["n_presentations"] == 5  # 3 + 2 rounds
    assert out["accuracy"] == 0.5  # row 11 right in all rounds, row 12 not
    assert out["vanilla_accuracy"] == 1.0  # both right in round 0


def test_mmbench_choice_extraction():
    opts = ["cat", "dog", "bird"]
    assert mmbench.extract_choice("A dog", opts) == "B"  # not letter A: names option "dog"
    assert mmbench.extract_choice("Bird.", opts) == "C"  # equals an option
    assert mmbench.extract_choice("(B)", opts) == "B"
    assert mmbench.extract_choice("a cat and a dog", opts) is None  # two options named
    assert mmbench.mmbench_prompt("Q?", ["x", "y"], hint="H") == "H\nQ?\nA. x\nB. y\n" + LETTER


# --------------------------------------------------------------------------- short answer
def test_short_answer_metrics_hand_computed():
    m = short_answer.short_answer_metrics(
        ["Two.", "a dog", "Yes, there is.", None, "Red"],
        ["2", "dog", "yes", "blue", "red"],
        ["count", "object", "exist", "color", "color"],
    )
    # right: "two"->"2", "a dog"->"dog", "red"; wrong: "yes there is" != "yes", missing
    assert m["accuracy"] == pytest.approx(0.6) and m["n"] == 5 and m["correct"] == 3
    assert m["per_category"] == {"color": 0.5, "count": 1.0, "exist": 0.0, "object": 1.0}
    assert m["per_category_n"] == {"color": 2, "count": 1, "exist": 1, "object": 1}
    assert m["missing"] == 1


def test_short_answer_misc():
    assert short_answer.is_correct("three", ["2", "3"])
    assert short_answer.short_answer_metrics([], [])["accuracy"] == 0.0
    assert short_answer.short_answer_metrics(["x"], ["x"])["per_category"] == {}
    with pytest.raises(ValueError):
        short_answer.short_answer_metrics(["x"], ["x", "y"])


# --------------------------------------------------------------------------- shared pieces
def test_prediction_reader_counts_bad_lines():
    preds = parse_prediction_lines(
        [
            '{"question_id": 1, "text": "yes"}',
            "",
            "not json",
            '{"question_id": 2}',
            '{"text": "no"}',
            "[1, 2]",
            '{"question_id": 3, "text": null}',
        ]
    )
    assert [r["question_id"] for r in preds.records] == [1]
    assert [n for n, _ in preds.malformed] == [3, 4, 5, 6, 7]  # the blank line 2 is ignored


def test_registry_exact_names_and_suffixes():
    assert benchmark_names() == sorted(
        ["pope", "vqav2", "textvqa", "gqa", "scienceqa_img", "mme", "mmbench", "short_answer"]
        + ["mmstar", "seedbench_img", "chair"]
    )
    for name in ("pope", "vqav2", "textvqa", "gqa", "short_answer"):
        assert get_benchmark(name).prompt_suffix == SHORT
    for name in ("scienceqa_img", "mmbench", "seedbench_img"):
        assert get_benchmark(name).prompt_suffix == LETTER
    # lmms-eval's MMStar post_prompt (tasks/mmstar/_default_template_yaml) has no final period.
    assert get_benchmark("mmstar").prompt_suffix == LETTER[:-1]
    assert get_benchmark("mme").prompt_suffix == "Please answer yes or no."
    for bad in ("POPE", "pop", "vqa"):
        with pytest.raises(UnknownComponentError, match="known: .*short_answer"):
            get_benchmark(bad)
