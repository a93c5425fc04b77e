"""End-to-end tests of the scoring CLI (``python -m lmm.commands.score``) on tiny files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmm.commands.score import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmm.commands.score", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def short_answer_files(tmp_path):
    ann = write_lines(
        tmp_path / "ann.jsonl",
        [
            json.dumps(r)
            for r in [
                {"question_id": "q1", "answer": "2", "category": "count"},
                {"question_id": "q2", "answer": "dog", "category": "object"},
                {"question_id": "q3", "answer": "dog", "category": "object"},
                {"question_id": "q4", "answer": "red", "category": "color"},
            ]
        ],
    )
    preds = write_lines(
        tmp_path / "preds.jsonl",
        [
            json.dumps({"question_id": "q1", "text": "Two"}),  # right ("two" -> "2")
            '{"question_id": "q2", "text": ',  # malformed: bad JSON
            json.dumps({"question_id": "q2"}),  # malformed: no text
            json.dumps({"text": "dog"}),  # malformed: no question_id
            json.dumps({"question_id": "q3", "text": "cat"}),  # wrong
            json.dumps({"question_id": "q99", "text": "x"}),  # unknown id
            json.dumps({"question_id": "q1", "text": "2."}),  # duplicate (last wins, still right)
        ],
    )  # q2 and q4: missing
    return ann, preds


def test_cli_end_to_end_with_malformed_and_missing(short_answer_files):
    ann, preds = short_answer_files
    proc = run_cli("short_answer", "--annotations", str(ann), "--predictions", str(preds))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert out["benchmark"] == "short_answer"
    assert out["accuracy"] == 0.25  # only q1 right out of 4
    assert out["n"] == 4
    assert (out["missing"], out["malformed"], out["unknown"], out["duplicates"]) == (2, 3, 1, 1)
    assert out["per_category"] == {"color": 0.0, "count": 1.0, "object": 0.0}
    assert "3 malformed prediction line(s)" in proc.stderr
    assert "2 question(s) have no prediction" in proc.stderr
    assert "q99" in proc.stderr and "duplicate" in proc.stderr


def test_cli_pope_directory(tmp_path):
    pope_dir = tmp_path / "pope"
    pope_dir.mkdir()
    for split in ("random", "popular", "adversarial"):
        write_lines(
            pope_dir / f"coco_pope_{split}.json",
            [
                json.dumps(r)
                for r in [
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
                ]
            ],
        )
    preds = write_lines(
        tmp_path / "answers.jsonl",
        [
            json.dumps(r)
            for r in [
                {"question_id": 1, "category": "random", "text": "Yes, there is."},
                {"question_id": 2, "category": "random", "text": "No."},
                {"question_id": 1, "category": "popular", "text": "Yes"},
                {"question_id": 2, "category": "popular", "text": "Yes"},
                {
                    "question_id": 1,
                    "category": "adversarial",
                    "text": "Not really",
                },  # parses as yes
                # adversarial q2 missing -> scored as a false positive
            ]
        ],
    )
    proc = run_cli("pope", "--annotations", str(pope_dir), "--predictions", str(preds))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # random: TP, TN -> f1 1.  popular: TP, FP -> p 1/2, r 1, f1 2/3.
    # adversarial: TP, FP(missing) -> f1 2/3.  mean f1 = (1 + 2/3 + 2/3) / 3 = 7/9
    assert out["splits"]["popular"]["f1"] == pytest.approx(2 / 3)
    assert out["mean_f1"] == pytest.approx(7 / 9)
    assert out["mean_accuracy"] == pytest.approx(2 / 3)  # (1 + 1/2 + 1/2) / 3
    assert out["missing"] == 1 and out["malformed"] == 0
    assert "1 question(s) have no prediction" in proc.stderr


def test_cli_mmbench_tsv(tmp_path):
    tsv = write_lines(
        tmp_path / "mmbench_dev.tsv",
        [
            "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\tl2-category\tsplit",
            "3\tWhich?\tnan\tcat\tdog\t\t\tB\tanimals\tperception\tdev",
            "1000003\tWhich?\tnan\tdog\tcat\t\t\tA\tanimals\tperception\tdev",
        ],
    )
    preds = write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps({"question_id": 3, "text": "B"}),
            json.dumps({"question_id": 1000003, "text": "The answer is A."}),
        ],
    )
    proc = run_cli("mmbench", "--annotations", str(tsv), "--predictions", str(preds))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["accuracy"] == 1.0 and out["n"] == 1 and out["n_presentations"] == 2


def test_cli_missing_files_exit_2(tmp_path, short_answer_files):
    ann, preds = short_answer_files
    nowhere = tmp_path / "nope" / "ann.json"
    proc = run_cli("short_answer", "--annotations", str(nowhere), "--predictions", str(preds))
    assert proc.returncode == 2
    assert str(nowhere) in proc.stderr and proc.stdout == ""
    proc = run_cli(
        "short_answer", "--annotations", str(ann), "--predictions", str(tmp_path / "gone.jsonl")
    )
    assert proc.returncode == 2 and "gone.jsonl" in proc.stderr


def test_cli_in_process_errors(tmp_path, short_answer_files, capsys):
    ann, preds = short_answer_files
    assert main(["vqa", "--annotations", str(ann), "--predictions", str(preds)]) == 2
    assert (
        "known: chair, gqa, mmbench, mme, mmstar, pope, scienceqa_img, seedbench_img, "
        "short_answer, textvqa, vqav2" in capsys.readouterr().err
    )

    assert (
        main(
            ["short_answer", "--annotations", str(ann), "--predictions", str(preds), "--split", "x"]
        )
        == 2
    )
    assert "--split is not supported" in capsys.readouterr().err

    bad = write_lines(tmp_path / "bad.jsonl", ['{"question_id": "q1"}'])  # no answer
    assert main(["short_answer", "--annotations", str(bad), "--predictions", str(preds)]) == 2
    err = capsys.readouterr().err
    assert "bad annotations" in err and "bad.jsonl" in err

    assert main(["short_answer", "--annotations", str(ann)]) == 2  # --predictions required
    capsys.readouterr()
    assert main(["--help"]) == 0
    assert "--predictions FILE" in capsys.readouterr().out


def test_cli_output_file(tmp_path, short_answer_files, capsys):
    ann, preds = short_answer_files
    target = tmp_path / "metrics.json"
    assert (
        main(
            [
                "short_answer",
                "--annotations",
                str(ann),
                "--predictions",
                str(preds),
                "--output",
                str(target),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(target.read_text()) == printed
    assert "_examples" not in printed


def test_eval_package_does_not_import_torch():
    code = (
        "import sys, lmm.commands.score, lmm.eval.registry; "
        "sys.exit(int(any(m == 'torch' or m.startswith('torch.') for m in sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0
