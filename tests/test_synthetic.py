"""Tests for the synthetic shapes world (lmm.worlds.shapes) and its CLI."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lmm.worlds.shapes.config import (
    PALETTE,
    POPE_STRATEGIES,
    POSITIONS_3X3,
    SHAPE_KINDS,
    SHORT_ANSWER_CATEGORIES,
    WorldConfig,
    position_names,
)
from lmm.worlds.shapes.corpus import world_corpus
from lmm.worlds.shapes.pope import compute_stats
from lmm.worlds.shapes.scene import image_rng, make_image, sample_objects
from lmm.worlds.shapes.text import kind_presence, make_conversation, object_phrase
from lmm.worlds.shapes.writer import OUTPUT_SPLITS, write_world

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(
    train_images=150,
    val_images=20,
    test_images=60,
    samples_per_shard=64,
    eval_samples_per_shard=100,
)


def small_cfg(**overrides: Any) -> WorldConfig:
    return WorldConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("world")
    return out, write_world(out, small_cfg(), num_workers=1, progress=False)


def read_split(out: Path, manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """All samples of a split as dicts with decoded json, raw png and key."""
    urls = [str(out / s) for s in manifest["splits"][split]["shards"]]
    samples = []
    for s in wds.WebDataset(urls, shardshuffle=False):
        assert set(k for k in s if not k.startswith("__")) == {"png", "json"}
        samples.append(
            {"key": s["__key__"], "png": s["png"], "json": json.loads(s["json"].decode("utf-8"))}
        )
    return samples


def file_digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --------------------------------------------------------------------------- oracle


def oracle(question: str, objects: list[dict[str, Any]]) -> str:
    """Independent re-derivation of the reference answer from the stored objects."""
    shapes = [o["shape"] for o in objects]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (obj,) = [o for o in objects if o["shape"] == m[1]]  # must be unique
        return obj["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (obj,) = [o for o in objects if o["color"] == m[1]]
        return obj["shape"]
    if question == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+?)(es|s) are there\?", question):
        kind = m[1] if m[1] in SHAPE_KINDS else m[1] + ("e" if m[2] == "es" else "")
        assert kind in SHAPE_KINDS, question
        return str(shapes.count(kind))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (obj,) = [o for o in objects if o["color"] == m[1] and o["shape"] == m[2]]
        return POSITIONS_3X3[obj["cell"]]
    if m := re.fullmatch(r"Is there an? (\w+) in the image\?", question):
        return "Yes" if m[1] in shapes else "No"
    raise AssertionError(f"unexpected question {question!r}")


def check_caption(caption: str, objects: list[dict[str, Any]]) -> None:
    """The caption names every object, in row-major cell order."""
    phrases = [object_phrase(o["shape"], o["color"], POSITIONS_3X3[o["cell"]]) for o in objects]
    positions = [caption.index(p) for p in phrases]
    assert positions == sorted(positions), caption
    assert caption.endswith(".") and caption.count(" a") + caption.startswith("a ") >= len(objects)


# --------------------------------------------------------------------------- tests


def test_determinism_and_worker_independence(
    tmp_path: Path, world: tuple[Path, dict[str, Any]]
) -> None:
    out, _ = world
    again = tmp_path / "again"
    write_world(again, small_cfg(), num_workers=2, progress=False)  # pool path
    assert file_digests(again) == file_digests(out)
    other = tmp_path / "other"
    write_world(other, small_cfg(seed=1), num_workers=1, progress=False)
    a, b = file_digests(out), file_digests(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_round_trip_and_schema(world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = world
    assert set(manifest["splits"]) == set(OUTPUT_SPLITS)
    assert manifest["config"] == small_cfg().to_dict() and manifest["seed"] == 0
    assert len(manifest["splits"]["pretrain"]["shards"]) == 3  # 150 samples / 64 per shard
    for split, info in manifest["splits"].items():
        samples = read_split(out, manifest, split)
        assert len(samples) == info["num_samples"] > 0
        assert all(re.fullmatch(r"shard-\d{6}\.tar", Path(s).name) for s in info["shards"])
        limit = 64 if split in ("pretrain", "finetune") else 100
        assert info["num_samples"] <= limit * len(info["shards"])
        assert len({s["json"].get("image_id", s["key"]) for s in samples}) == info["num_images"]
        for s in samples:
            j = s["json"]
            assert re.fullmatch(r"[A-Za-z0-9_-]+", s["key"]) and j["id"] == s["key"]
            assert j["image"] == f"{s['key']}.png"
            img = Image.open(io.BytesIO(s["png"]))
            assert img.size == (48, 48) and img.mode == "RGB"
            conv = j["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) + ["human"] * (
                len(conv) % 2
            )
            assert conv[0]["value"].startswith("<image>\n")
            assert sum("<image>" in t["value"] for t in conv) == 1
            assert all(set(o) >= {"shape", "color", "cell"} for o in j["objects"])
        if split not in ("pretrain", "finetune"):  # eval: one question each, ids running
            assert [s["json"]["question_id"] for s in samples] == list(range(len(samples)))
            assert all(len(s["json"]["conversations"]) == 1 for s in samples)


def test_pretrain_and_finetune_share_images(world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = world
    pre, fine = read_split(out, manifest, "pretrain"), read_split(out, manifest, "finetune")
    assert [s["key"] for s in pre] == [s["key"] for s in fine]
    assert all(
        p["png"] == f["png"] and p["json"]["objects"] == f["json"]["objects"]
        for p, f in zip(pre, fine)
    )


def test_answers_match_objects(world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = world
    for s in read_split(out, manifest, "pretrain"):
        conv = s["json"]["conversations"]
        assert conv[0]["value"] == "<image>\nDescribe the image briefly."
        check_caption(conv[1]["value"], s["json"]["objects"])
    exist = defaultdict(int)
    for s in read_split(out, manifest, "finetune"):
        j = s["json"]
        turns = list(zip(j["conversations"][::2], j["conversations"][1::2]))
        assert 2 <= len(turns) <= 4 and len(j["categories"]) == len(turns)
        assert len({q["value"] for q, _ in turns}) == len(turns)  # no repeated question
        for (q, a), cat in zip(turns, j["categories"]):
            question = q["value"].removeprefix("<image>\n")
            if cat == "describe":
                assert question == "Describe the image."
                check_caption(a["value"], j["objects"])
            else:
                assert a["value"] == oracle(question, j["objects"]), (question, j["objects"])
            if cat == "exist":
                exist[a["value"]] += 1
    assert exist["Yes"] > 0 and exist["No"] > 0
    for split in ("val", "test/short_answer"):
        for s in read_split(out, manifest, split):
            j = s["json"]
            question = j["conversations"][0]["value"].removeprefix("<image>\n")
            expected = oracle(question, j["objects"])
            assert j["answer"] == (expected.lower() if j["category"] == "pope" else expected)
            assert j["category"] in ("color", "shape", "count", "position", "pope")


def test_short_answer_categories_balanced(world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = world
    counts = defaultdict(int)
    for s in read_split(out, manifest, "test/short_answer"):
        counts[s["json"]["category"]] += 1
    assert set(counts) == set(SHORT_ANSWER_CATEGORIES)
    assert max(counts.values()) <= 2 * min(counts.values())


def test_pope(world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = world
    stats, shapes = manifest["stats"], list(SHAPE_KINDS)
    counts, cooc = stats["image_counts"], stats["cooccurrence"]
    positives: dict[str, dict[str, list[str]]] = {}
    for strategy in POPE_STRATEGIES:
        per_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in read_split(out, manifest, f"test/pope_{strategy}"):
            per_image[s["json"]["image_id"]].append(s["json"])
        assert len(per_image) == manifest["splits"][f"test/pope_{strategy}"]["num_images"]
        for image_id, items in per_image.items():
            present = {o["shape"] for o in items[0]["objects"]}
            asked = [
                re.fullmatch(r"Is there an? (\w+) in the image\?", j["text"])[1] for j in items
            ]
            assert all(j["answer"] == j["label"] and j["category"] == "pope" for j in items)
            assert all(j["conversations"][0]["value"] == "<image>\n" + j["text"] for j in items)
            yes = [k for k, j in zip(asked, items) if j["label"] == "yes"]
            no = [k for k, j in zip(asked, items) if j["label"] == "no"]
            k = min(3, len(present), len(shapes) - len(present))
            assert len(yes) == len(no) == k and len(set(asked)) == len(asked)
            assert set(yes) <= present and not set(no) & present
            absent = [s for s in shapes if s not in present]
            if strategy == "popular":  # the k most frequent absent kinds in the training data
                assert min(counts[s] for s in no) >= max(
                    [counts[s] for s in absent if s not in no], default=0
                )
            if (
                strategy == "adversarial"
            ):  # the absent kinds co-occurring most with the present ones
                score = {s: sum(cooc[p][s] for p in present) for s in absent}
                assert min(score[s] for s in no) >= max(
                    [score[s] for s in absent if s not in no], default=0
                )
            positives.setdefault(image_id, {})[strategy] = yes
    # POPE shares the positives between the three settings.
    assert all(len({tuple(v) for v in p.values()}) == 1 for p in positives.values())


def test_pope_settings_differ(world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = world
    texts = {
        s: [j["json"]["text"] for j in read_split(out, manifest, f"test/pope_{s}")]
        for s in POPE_STRATEGIES
    }
    assert texts["random"] != texts["popular"] != texts["adversarial"]


def test_test_images_held_out(world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = world

    def layouts(split: str) -> set[str]:
        return {json.dumps(s["json"]["objects"]) for s in read_split(out, manifest, split)}

    def pixels(split: str) -> set[bytes]:
        return {
            np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes()
            for s in read_split(out, manifest, split)
        }

    train = layouts("pretrain")
    assert not train & layouts("test/pope_random") and not train & layouts("val")
    assert not layouts("val") & layouts("test/short_answer")
    assert not pixels("pretrain") & pixels("test/short_answer")


def test_idempotent_and_overwrite(tmp_path: Path) -> None:
    cfg = small_cfg(train_images=10, val_images=3, test_images=3)
    first = write_world(tmp_path, cfg, num_workers=1, progress=False)
    shard = tmp_path / first["splits"]["pretrain"]["shards"][0]
    shard.write_bytes(b"sentinel")  # a reused world is left untouched
    assert write_world(tmp_path, cfg, num_workers=1, progress=False) == first
    assert shard.read_bytes() == b"sentinel"
    write_world(tmp_path, cfg, num_workers=1, progress=False, overwrite=True)
    assert shard.read_bytes() != b"sentinel"
    # A different config regenerates and leaves no stale shard behind.
    write_world(
        tmp_path,
        small_cfg(train_images=200, val_images=3, test_images=3),
        num_workers=1,
        progress=False,
    )
    write_world(tmp_path, cfg, num_workers=1, progress=False)
    assert len(list((tmp_path / "pretrain").glob("*.tar"))) == 1


def test_make_image_geometry() -> None:
    cfg = WorldConfig()
    cell = cfg.image_size / cfg.grid
    for i in range(200):
        img, objects = make_image(cfg, image_rng(cfg, "unit", i))
        assert img.size == (48, 48) and 1 <= len(objects) <= 4
        assert len({o.cell for o in objects}) == len(objects)
        arr = np.asarray(img).astype(int)
        for o in objects:
            row, col = divmod(o.cell, 3)
            x0, y0, x1, y1 = o.to_json()["bbox"]
            assert (
                col * cell <= x0
                and x1 <= (col + 1) * cell
                and row * cell <= y0
                and y1 <= (row + 1) * cell
            )
            assert 0.6 * cell - 1e-6 <= o.size <= 0.85 * cell + 1e-6
            centre = arr[int(o.cy), int(o.cx)]  # the middle of every shape is solid colour
            assert np.abs(centre - np.array(PALETTE[o.color])).max() <= 8
        assert tuple(arr[0, 0]) == cfg.background or any(o.cell == 0 for o in objects)


def test_distribution_skew_and_partners() -> None:
    cfg = WorldConfig()
    stats = compute_stats(
        cfg, (sample_objects(cfg, image_rng(cfg, "unit", i)) for i in range(3000))
    )
    counts, cooc = stats["image_counts"], stats["cooccurrence"]
    assert (
        counts["circle"] > counts["triangle"] > counts["star"]
        and counts["circle"] >= 2 * counts["star"]
    )
    for a, b in cfg.partner_pairs:  # each kind co-occurs most with its partner
        assert max(cooc[a], key=cooc[a].get) == b and max(cooc[b], key=cooc[b].get) == a


def test_world_corpus_covers_all_texts(world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = world
    corpus = world_corpus(WorldConfig())
    assert len(corpus) < 5000
    vocab = set(re.findall(r"[\w']+|[^\w\s]", "\n".join(corpus)))
    for split in ("pretrain", "finetune", "val", "test/short_answer", "test/pope_adversarial"):
        for s in read_split(out, manifest, split):
            text = " ".join(
                t["value"].removeprefix("<image>\n") for t in s["json"]["conversations"]
            )
            text += " " + s["json"].get("answer", "")
            assert set(re.findall(r"[\w']+|[^\w\s]", text)) <= vocab, text


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        WorldConfig(grid=4)
    with pytest.raises(ValueError):
        position_names(2)
    with pytest.raises(ValueError):
        WorldConfig(colors=("red", "mauve"))
    with pytest.raises(ValueError):
        WorldConfig(max_objects=10)
    cfg = WorldConfig(seed=3)
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg


def _shapes_world(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.shapes_world", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_cli(tmp_path: Path) -> None:
    help_run = _shapes_world("--help")
    assert (
        help_run.returncode == 0
        and "--train-images" in help_run.stdout
        and "--seed" in help_run.stdout
    )
    out = tmp_path / "cli_world"
    args = [
        "--train-images",
        "20",
        "--val-images",
        "4",
        "--test-images",
        "4",
        "--seed",
        "5",
        "--no-progress",
        "--workers",
        "1",
    ]
    run = _shapes_world("--out", str(out), *args)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["splits"]["pretrain"]["num_samples"] == 20
    assert manifest["config"]["turns_per_sample"] == 0 and not manifest["config"]["balanced_exist"]
    split_out = tmp_path / "cli_world_split"
    run = _shapes_world(
        "--out", str(split_out), *args, "--turns-per-sample", "1", "--balanced-exist"
    )
    assert run.returncode == 0, run.stderr
    split = json.loads((split_out / "manifest.json").read_text())
    assert split["config"]["turns_per_sample"] == 1 and split["config"]["balanced_exist"]
    assert split["splits"]["finetune"]["num_samples"] > 20  # one sample per question, ~3 per image
    assert _shapes_world("--out", str(out), "--grid", "4").returncode != 0


def test_category_weights_shift_the_question_mix():
    def mix(cfg):
        counts = defaultdict(int)
        for i in range(200):
            rng = image_rng(cfg, "train", i)
            for _, _, category in make_conversation(cfg, sample_objects(cfg, rng), "caption", rng):
                counts[category] += 1
        return counts

    uniform = mix(WorldConfig())
    exist_heavy = mix(WorldConfig(category_weights=(1, 1, 1, 1, 4)))
    no_color = mix(WorldConfig(category_weights=(0, 1, 1, 1, 1)))
    assert exist_heavy["exist"] > 1.5 * uniform["exist"]
    assert no_color["color"] == 0 and uniform["color"] > 0
    with pytest.raises(ValueError, match="category_weights"):
        WorldConfig(category_weights=(1, 1, 1))
    with pytest.raises(ValueError, match="category_weights"):
        WorldConfig(category_weights=(0, 0, 0, 0, 0))


def test_image_after_question_moves_only_the_placeholder(tmp_path: Path) -> None:
    """``image_after_question`` writes ``question\\n<image>`` in the first human turn of
    finetune and eval samples; images, questions and answers stay the same."""
    runs = {}
    for flag in (False, True):
        cfg = small_cfg(image_after_question=flag, train_images=8, val_images=4, test_images=4)
        out = tmp_path / str(flag)
        manifest = write_world(out, cfg, num_workers=1, progress=False)
        runs[flag] = {
            split: read_split(out, manifest, split) for split in ("finetune", "test/short_answer")
        }
    for split, before in runs[False].items():
        after = runs[True][split]
        assert [s["png"] for s in before] == [s["png"] for s in after]
        for b, a in zip(before, after):
            first_b, first_a = (
                b["json"]["conversations"][0]["value"],
                a["json"]["conversations"][0]["value"],
            )
            question = first_b.removeprefix("<image>\n")
            assert first_b == "<image>\n" + question and first_a == question + "\n<image>"
            assert b["json"]["conversations"][1:] == a["json"]["conversations"][1:]


def test_turns_per_sample_splits_each_conversation_without_changing_it(tmp_path: Path) -> None:
    """``turns_per_sample=1``: every turn of an image's conversation becomes its own sample
    (same image, question placed as the first turn's), in order; pretrain/eval are unchanged."""
    runs = {}
    for k in (0, 1, 2):
        cfg = small_cfg(
            turns_per_sample=k,
            image_after_question=True,
            train_images=6,
            val_images=2,
            test_images=2,
        )
        out = tmp_path / str(k)
        manifest = write_world(out, cfg, num_workers=1, progress=False)
        runs[k] = {
            split: read_split(out, manifest, split)
            for split in ("pretrain", "finetune", "test/short_answer")
        }
    whole = runs[0]["finetune"]
    for k in (1, 2):
        assert (
            runs[k]["pretrain"] == runs[0]["pretrain"]
            and runs[k]["test/short_answer"] == runs[0]["test/short_answer"]
        )
        parts = runs[k]["finetune"]
        by_image = defaultdict(list)
        for s in parts:
            by_image[s["json"]["id"].rsplit("-t", 1)[0]].append(s)
        assert sorted(by_image) == sorted(s["json"]["id"] for s in whole)
        for sample in whole:
            pieces = by_image[sample["json"]["id"]]
            turns = sample["json"]["conversations"]
            assert len(pieces) == -(-len(turns) // (2 * k))  # ceil(turns / k) samples
            joined = []
            for piece in pieces:
                conv = piece["json"]["conversations"]
                assert (
                    piece["png"] == sample["png"]
                    and piece["json"]["image"] == piece["json"]["id"] + ".png"
                )
                assert 2 <= len(conv) <= 2 * k and conv[0]["value"].endswith("\n<image>")
                assert all("<image>" not in t["value"] for t in conv[1:])
                joined += [{**conv[0], "value": conv[0]["value"].removesuffix("\n<image>")}] + conv[
                    1:
                ]
            assert (
                joined
                == [{**turns[0], "value": turns[0]["value"].removesuffix("\n<image>")}] + turns[1:]
            )
    with pytest.raises(ValueError, match="turns_per_sample"):
        WorldConfig(turns_per_sample=-1)


def _exist_answers(
    cfg: WorldConfig, n_images: int
) -> tuple[dict[str, list[int]], dict[int, list[int]]]:
    """[Yes count, No count] of the existence questions of ``n_images`` conversations, per
    kind asked and per number of objects in the image."""
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_crowding: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for i in range(n_images):
        objects = sample_objects(cfg, image_rng(cfg, "train", i, 0))
        for question, answer, category in make_conversation(
            cfg, objects, "", image_rng(cfg, "train", i, 1)
        ):
            if category == "exist":
                shape = re.match(r"Is there an? (\w+)", question).group(1)
                by_kind[shape][answer == "No"] += 1
                by_crowding[len(objects)][answer == "No"] += 1
                assert (answer == "Yes") == any(o.shape == shape for o in objects)
    return by_kind, by_crowding


def test_balanced_exist_asks_every_kind_and_every_image_as_often_yes_as_no() -> None:
    """With a coin per question the rarest kind is mostly asked while absent (a prior a model can
    answer from); ``balanced_exist`` keeps every kind's Yes share near one half and pairs every
    Yes with a No in the same image, so how crowded an image is does not predict it either."""
    base = WorldConfig(category_weights=(1, 1, 1, 1, 3), min_turns=3, max_turns=6)
    presence = kind_presence(base)
    assert presence["circle"] > presence["star"] + 0.15  # the linear kind weights, 3 down to 1
    by_kind, _ = _exist_answers(base, 2000)
    yes, no = by_kind["star"]
    assert yes / (yes + no) < 0.4
    balanced = WorldConfig(**{**base.__dict__, "balanced_exist": True})
    by_kind, by_crowding = _exist_answers(balanced, 2000)
    for shape in base.shapes:
        yes, no = by_kind[shape]
        assert yes + no > 300 and abs(yes / (yes + no) - 0.5) < 0.08, (shape, yes, no)
    assert all(yes == no > 0 for yes, no in by_crowding.values()), dict(by_crowding)
    for i in range(200):  # and within every single image
        objects = sample_objects(balanced, image_rng(balanced, "train", i, 0))
        answers = [
            a
            for _, a, c in make_conversation(
                balanced, objects, "", image_rng(balanced, "train", i, 1)
            )
            if c == "exist"
        ]
        assert (
            answers.count("Yes") == answers.count("No") == min(2, len({o.shape for o in objects}))
        )


def test_grid_captions_name_every_cell_in_order(tmp_path: Path) -> None:
    cfg = small_cfg(caption_style="grid", train_images=30)
    manifest = write_world(tmp_path, cfg, num_workers=1, progress=False)
    corpus_words = set(re.findall(r"[\w']+|[^\w\s]", "\n".join(world_corpus(WorldConfig()))))
    describe = 0
    for split in ("pretrain", "finetune"):
        for s in read_split(tmp_path, manifest, split):
            for q, a in zip(s["json"]["conversations"][::2], s["json"]["conversations"][1::2]):
                if "Describe" not in q["value"]:
                    continue
                describe += 1
                by_cell = {o["cell"]: o for o in s["json"]["objects"]}
                parts = a["value"].removesuffix(".").split(", ")
                assert [p.split(": ")[0] for p in parts] == list(POSITIONS_3X3)
                for cell, part in enumerate(parts):
                    o = by_cell.get(cell)
                    assert part.split(": ")[1] == (f"{o['color']} {o['shape']}" if o else "empty")
                assert set(re.findall(r"[\w']+|[^\w\s]", a["value"])) <= corpus_words
    assert describe >= 30  # every pretrain sample, plus the finetune describe turns


def test_kinds_captions_group_the_objects_by_kind_in_kind_order(tmp_path: Path) -> None:
    cfg = small_cfg(caption_style="kinds", train_images=40)
    manifest = write_world(tmp_path, cfg, num_workers=1, progress=False)
    corpus_words = set(re.findall(r"[\w']+|[^\w\s]", "\n".join(world_corpus(WorldConfig()))))
    captions = 0
    for s in read_split(tmp_path, manifest, "pretrain"):
        caption = s["json"]["conversations"][1]["value"]
        objects = sorted(s["json"]["objects"], key=lambda o: o["cell"])
        assert caption.endswith(".") and set(re.findall(r"[\w']+|[^\w\s]", caption)) <= corpus_words
        groups = [g.split(": ") for g in caption.removesuffix(".").split(". ")]
        kinds = [kind for kind, _ in groups]
        assert kinds == [
            k for k in cfg.shapes if any(o["shape"] == k for o in objects)
        ]  # present kinds, in order
        for kind, members in groups:
            named = []
            for member in members.split(", "):
                color, _, phrase = member.partition(" ")
                named.append(
                    (color, phrase.split(" the ", 1)[1])
                )  # "at the top left" -> "top left"
            assert named == [
                (o["color"], POSITIONS_3X3[o["cell"]]) for o in objects if o["shape"] == kind
            ]
        captions += 1
    assert captions == 40


def test_unknown_caption_style_is_refused() -> None:
    with pytest.raises(ValueError, match="caption_style"):
        WorldConfig(caption_style="dense")
