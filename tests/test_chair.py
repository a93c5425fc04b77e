"""CHAIR (lmm.eval.chair): hand-computed cases, COCO-style files through ``lmm score chair``,
the shapes world's caption split, and CHAIR (and likelihood-scored POPE) through ``lmm test``
and the tiny pipeline's summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lmm.commands.score import main as score_main
from lmm.eval.chair import SynonymTable, chair_metrics, read_synonyms

# The reference's synonyms.txt format (LisaAnne/Hallucination data/synonyms.txt): one category
# per line, "category, synonym, ..."; lines copied from it, shortened. Its double space in the
# motorcycle line is kept on purpose.
SYNONYMS = """person, girl, boy, man, woman, kid, child, people, passenger, baby
motorcycle, scooter,  motor bike, motor cycle, motorbike
train, locomotive, tramway, caboose
bear, panda
dog, puppy, beagle, pup
cat, kitten, feline, tabby
tie, bow, bow tie
hot dog
chair, seat, stool
toilet, urinal, commode, toilet, lavatory, potty
teddy bear, teddybear
"""

# (caption, ground-truth categories, [categories mentioned, in order], hallucinated mentions)
CASES = [
    # plurals and irregular plurals; "hot dogs" is one mention of hot dog, not of dog
    ("A man and two women eat hot dogs next to a dog.", {"person", "hot dog"},
     ["person", "person", "hot dog", "dog"], 1),
    # multi-word objects: "teddy bears" is a teddy bear; the bare "bear" is a bear
    ("Teddy bears and a teddy bear sit by a bear.", {"teddy bear"},
     ["teddy bear", "teddy bear", "bear"], 1),
    # repeated mentions each count
    ("A puppy, a puppy and another puppy.", {"cat"}, ["dog", "dog", "dog"], 3),
    # COCO rules: "toilet seat" is a toilet; "seat" is no chair in a caption saying toilet
    ("A toilet seat and a cat on a seat next to a toilet.", {"toilet", "cat"},
     ["toilet", "cat", "toilet"], 0),
    # "baby" alone is a person; "train track" is no train
    ("A baby on a train track.", {"dog"}, ["person"], 1),
]  # fmt: skip


@pytest.fixture
def table(tmp_path) -> SynonymTable:
    path = tmp_path / "synonyms.txt"
    path.write_text(SYNONYMS)
    return read_synonyms(path, coco_rules=True)


def test_mentions_hand_computed(table):
    for caption, truth, mentioned, hallucinated in CASES:
        assert [node for _, node in table.mentions(caption)] == mentioned, caption
        assert chair_metrics([caption], [truth], table)["hallucinated_mentions"] == hallucinated
    # The file's "  motor bike" (double space) still names a motorcycle; "baby dog" is a dog.
    assert [n for _, n in table.mentions("Two motor bikes and a baby dog")] == ["motorcycle", "dog"]
    assert [n for _, n in table.mentions("A bow tie on persons")] == ["tie", "person"]


def test_chair_s_and_chair_i_hand_computed(table):
    m = chair_metrics([c for c, *_ in CASES], [t for _, t, *_ in CASES], table)
    # mentions 4 + 3 + 3 + 3 + 1 = 14, hallucinated 1 + 1 + 3 + 0 + 1 = 6 (CHAIR_i, per mention);
    # 4 of 5 captions have a hallucinated mention (CHAIR_s).
    assert (m["mentions"], m["hallucinated_mentions"]) == (14, 6)
    assert m["chair_i"] == pytest.approx(6 / 14) and m["chair_s"] == pytest.approx(4 / 5)
    # recall: mentioned ground-truth categories 2 + 1 + 0 + 2 + 0 of 2 + 1 + 1 + 2 + 1
    assert m["recall"] == pytest.approx(5 / 7)
    assert m["hallucinated_objects"] == {"dog": 4, "bear": 1, "person": 1}


def test_score_chair_on_coco_style_files(tmp_path, capsys):
    (tmp_path / "synonyms.txt").write_text(SYNONYMS)
    ann = tmp_path / "annotations"
    ann.mkdir()
    categories = [
        {"id": 1, "name": "person"},
        {"id": 17, "name": "cat"},
        {"id": 18, "name": "dog"},
        {"id": 70, "name": "toilet"},
        {"id": 88, "name": "teddy bear"},
    ]
    instances = [(1, 1), (1, 1), (2, 88), (3, 17), (4, 70), (5, 18)]  # (image, category)
    (ann / "instances_val2014.json").write_text(
        json.dumps(
            {
                "categories": categories,
                "images": [{"id": i} for i in range(1, 6)],
                "annotations": [{"image_id": i, "category_id": c} for i, c in instances],
            }
        )
    )
    # Categories named by the reference captions count as ground truth too: image 1 gets
    # hot dog, image 4 cat; image 3 a dog nowhere else.
    captions = [
        (1, "A person holding a hot dog."),
        (4, "A kitten next to a toilet."),
        (3, "A pup."),
    ]
    (ann / "captions_val2014.json").write_text(
        json.dumps({"annotations": [{"image_id": i, "caption": c} for i, c in captions]})
    )
    generated = [{"image_id": i, "caption": c} for i, (c, *_) in enumerate(CASES, start=1)]
    generated[2]["caption"] = "A puppy, a puppy and a cat."  # image 3: dog from its captions
    generated.append({"image_id": 42, "caption": "A dog."})  # no ground truth: unknown
    preds = tmp_path / "captions.jsonl"
    preds.write_text("".join(json.dumps(g) + "\n" for g in generated))
    argv = ["chair", "--annotations", str(ann), "--synonyms", str(tmp_path / "synonyms.txt"),
            "--predictions", str(preds)]  # fmt: skip
    assert score_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    # Mentions 4 + 3 + 3 + 3 + 1; hallucinated: dog (1), bear (2), none (3), none (4), person (5).
    assert (out["mentions"], out["hallucinated_mentions"], out["unknown"]) == (14, 3, 1)
    assert out["chair_i"] == pytest.approx(3 / 14) and out["chair_s"] == pytest.approx(3 / 5)
    # The reference's own input, the coco-caption evaluation file, reads the same.
    img_to_eval = {
        str(g["image_id"]): {"image_id": g["image_id"], "caption": g["caption"]} for g in generated
    }
    (tmp_path / "eval.json").write_text(json.dumps({"overall": {}, "imgToEval": img_to_eval}))
    argv[-1] = str(tmp_path / "eval.json")
    assert score_main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["chair_i"], again["chair_s"]) == (out["chair_i"], out["chair_s"])
    # COCO ground truth without the table is refused with what to do.
    assert score_main(["chair", "--annotations", str(ann), "--predictions", str(preds)]) == 2
    assert "--synonyms" in capsys.readouterr().err
    # The table is CHAIR's option only.
    argv = [
        "pope",
        "--annotations",
        str(preds),
        "--predictions",
        str(preds),
        "--synonyms",
        str(preds),
    ]
    assert score_main(argv) == 2 and "only for chair" in capsys.readouterr().err


# -- the shapes world ------------------------------------------------------------------------------


def _hashes(root: Path, splits) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for split in splits
        for p in sorted((root / split).glob("*.tar"))
    }


def test_caption_split_leaves_the_other_splits_unchanged(tmp_path):
    from lmm.worlds.shapes.config import WorldConfig
    from lmm.worlds.shapes.samples import CAPTION_SPLIT
    from lmm.worlds.shapes.writer import CHAIR_SYNONYMS, OUTPUT_SPLITS, write_world

    kw = dict(
        train_images=24,
        val_images=4,
        test_images=10,
        samples_per_shard=16,
        eval_samples_per_shard=8,
    )
    with_captions = write_world(
        tmp_path / "a", WorldConfig(**kw, caption_test_images=6), num_workers=1, progress=False
    )
    write_world(
        tmp_path / "b", WorldConfig(**kw, caption_test_images=0), num_workers=1, progress=False
    )
    others = [s for s in OUTPUT_SPLITS if s != CAPTION_SPLIT]
    assert _hashes(tmp_path / "a", others) == _hashes(tmp_path / "b", others)
    assert with_captions["splits"][CAPTION_SPLIT]["num_images"] == 6
    import webdataset as wds

    urls = [str(tmp_path / "a" / s) for s in with_captions["splits"][CAPTION_SPLIT]["shards"]]
    samples = [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(samples) == 6
    kinds = WorldConfig().shapes
    for s in samples:  # the finetune describe prompt; ground truth = the kinds in the image
        assert s["conversations"] == [{"from": "human", "value": "<image>\nDescribe the image."}]
        assert s["gt_objects"] == [k for k in kinds if k in {o["shape"] for o in s["objects"]}]
    table = read_synonyms(tmp_path / "a" / CAPTION_SPLIT / CHAIR_SYNONYMS, coco_rules=False)
    assert table.categories == set(kinds)
    assert [n for _, n in table.mentions("two crosses, a star and circles")] == [
        "cross",
        "star",
        "circle",
    ]


def test_lmm_test_reports_chair_and_likelihood_pope(tiny_models, tiny_world, tmp_path, monkeypatch):
    """`lmm test` with a likelihood-scored POPE set and a CHAIR caption set: the metrics are
    those of the written predictions. (Captions come from a stand-in for decoding: a random
    model names no shape.)"""
    from lmm.eval.pope import pope_metrics
    from lmm.eval.ranking import auc_roc
    from lmm.model.lmm import LMM
    from lmm.train.cli import LMMCLI

    longest = []

    def captions(self, input_ids, attention_mask, pixel_values, **kwargs):
        longest.append(kwargs["max_new_tokens"])
        return ["Two circles and a star."] * input_ids.shape[0]

    monkeypatch.setattr(LMM, "generate_text", captions)

    root, _ = tiny_world
    sets = [
        {"name": "pope_random", "shards": f"{root}/test/pope_random/shard-*.tar", "kind": "pope",
         "scoring": "likelihood"},
        {"name": "caption", "shards": f"{root}/test/caption/shard-*.tar", "kind": "chair",
         "max_new_tokens": 24, "synonyms": f"{root}/test/caption/chair_synonyms.txt"},
    ]  # fmt: skip
    args = [
        "test",
        "--model.vision.name_or_path", str(tiny_models["vision"]), "--model.vision.feature_layer", "-1",
        "--model.llm.name_or_path", str(tiny_models["llm"]),
        "--model.generation.max_new_tokens", "1", "--model.results_dir", str(tmp_path),
        "--data.template", "vicuna", "--data.test", json.dumps(sets), "--data.eval_batch_size", "4",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    metrics = LMMCLI(args=args).model.test_metrics

    def read(name):
        return [
            json.loads(x) for x in (tmp_path / f"predictions_{name}.jsonl").read_text().splitlines()
        ]

    pope = read("pope_random")
    assert all(set(r["probs"]) == {"Yes", "No"} and r["text"] in ("Yes", "No") for r in pope)
    p_yes = [r["probs"]["Yes"] for r in pope]
    expected = pope_metrics([r["text"] for r in pope], [r["answer"] for r in pope], p_yes)
    assert metrics["pope_random"] == pytest.approx(expected)
    assert metrics["pope_auc_roc"] == pytest.approx(
        auc_roc([r["answer"] == "yes" for r in pope], p_yes)
    )
    caps = read("caption")
    assert len(caps) == 8 and all(r["gt_objects"] for r in caps)
    table = read_synonyms(root / "test" / "caption" / "chair_synonyms.txt", coco_rules=False)
    expected = chair_metrics([r["text"] for r in caps], [r["gt_objects"] for r in caps], table)
    assert metrics["caption"] == expected and expected["mentions"] == 16
    assert 0 < expected["hallucinated_mentions"] < 16
    assert set(longest) == {24}  # the set's own max_new_tokens; POPE was never decoded


def test_tiny_pipeline_summary_shows_chair_for_real_and_blank_images(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from lmm.commands import tiny as pipeline

    def metrics(chair_s, chair_i):
        m = {
            s: {"f1": 0.5, "accuracy": 0.5, "yes_ratio": 0.5}
            for s in ("pope_random", "pope_popular", "pope_adversarial")
        }
        m["short_answer"] = {"accuracy": 0.25}
        m["caption"] = {"chair_s": chair_s, "chair_i": chair_i, "recall": 0.9, "n": 150}
        return m

    results = iter([None, None, metrics(0.12, 0.05), metrics(0.87, 0.64)])
    monkeypatch.setattr(pipeline, "prepare", lambda workdir, world: None)
    monkeypatch.setattr(
        pipeline,
        "run_cli",
        lambda args: SimpleNamespace(model=SimpleNamespace(test_metrics=next(results))),
    )
    monkeypatch.setattr(pipeline, "WORKDIR", tmp_path)
    assert pipeline.main([]) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["test"]["caption"]["chair_i"] == 0.05
    assert summary["blank_control"]["caption"]["chair_s"] == 0.87
    out = capsys.readouterr().out
    assert "captions           CHAIR_s 0.120  CHAIR_i 0.050" in out
    assert "blank-image captions CHAIR_s 0.870  CHAIR_i 0.640" in out
