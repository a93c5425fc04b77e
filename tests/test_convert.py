"""data_prep converters: LLaVA-schema JSON + image folders -> shards, manifest, report.

Everything is fabricated in tmp_path: a few tiny images laid out like LLaVA-1.5's folders
(COCO, GQA, OCR-VQA with a .gif behind a .jpg name, VG with an empty file) and records
covering every skip reason, text-only samples and multi-image samples.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import data_prep.convert as conv
from data_prep.convert import convert, sample_key
from data_prep.llava import main as llava_main
from data_prep.presets import PRESETS, detect_preset
from data_prep.sharegpt4v import main as sharegpt4v_main
from lmm.data.manifest import estimate_tokens, read_manifest

Q = [
    {"from": "human", "value": "<image>\nWhat is shown?"},
    {"from": "gpt", "value": "A red square on grey."},
]


def image_bytes(fmt: str, color=(200, 30, 30), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def conv_of(*pairs: str) -> list[dict]:
    out = []
    for i, text in enumerate(pairs):
        out.append({"from": "human" if i % 2 == 0 else "gpt", "value": text})
    return out


@pytest.fixture
def dataset(tmp_path) -> dict:
    """Image folders + a mix665k-like annotation file; returns paths and the expected outcome."""
    img = tmp_path / "images"
    files = {
        "coco/train2017/000000000009.jpg": image_bytes("JPEG"),
        "coco/train2017/000000000025.jpg": image_bytes("JPEG", (10, 200, 10)),
        "gqa/images/2354786.png": image_bytes("PNG", (10, 10, 200)),
        "ocr_vqa/images/0001.gif": image_bytes("GIF"),  # the annotation says 0001.jpg
        "vg/VG_100K_2/empty.jpg": b"",
        "textvqa/train_images/cut.jpg": image_bytes("JPEG", size=(64, 64))[:200],  # truncated
        "textvqa/train_images/junk.jpg": b"\xff\xd8 definitely not a jpeg",
    }
    for rel, data in files.items():
        (img / rel).parent.mkdir(parents=True, exist_ok=True)
        (img / rel).write_bytes(data)
    (tmp_path / "outside.jpg").write_bytes(image_bytes("JPEG"))
    good = [
        {"id": "coco-1", "image": "coco/train2017/000000000009.jpg", "conversations": Q},
        {
            "id": "sharegpt-1",
            "conversations": conv_of(
                "Tell me a joke.",
                "Why did the chicken cross the road?",
                "Why?",
                "To get to the other side.",
            ),
        },
        {
            "id": "gqa-1",
            "image": "gqa/images/2354786.png",
            "conversations": conv_of("<image>\nColour?", "Blue."),
        },
        {
            "id": "ocr-1",
            "image": "ocr_vqa/images/0001.jpg",
            "conversations": conv_of("<image>\nTitle?", "Red."),
        },
        {
            "id": "multi-1",
            "image": ["coco/train2017/000000000009.jpg", "gqa/images/2354786.png"],
            "conversations": conv_of(
                "<image>\n<image>\nCompare the two.", "Left is red, right is blue."
            ),
        },
        {"id": "../../evil", "image": "coco/train2017/000000000025.jpg", "conversations": Q},
    ]
    bad = [
        (
            {"id": "missing", "image": "coco/train2017/nope.jpg", "conversations": Q},
            "image_missing",
        ),
        ({"id": "escape", "image": "../outside.jpg", "conversations": Q}, "image_missing"),
        (
            {"id": "empty-file", "image": "vg/VG_100K_2/empty.jpg", "conversations": Q},
            "image_decode",
        ),
        (
            {"id": "truncated", "image": "textvqa/train_images/cut.jpg", "conversations": Q},
            "image_decode",
        ),
        (
            {"id": "junk", "image": "textvqa/train_images/junk.jpg", "conversations": Q},
            "image_decode",
        ),
        (
            {
                "id": "count",
                "image": "coco/train2017/000000000009.jpg",
                "conversations": conv_of("No marker here.", "Fine."),
            },
            "image_count",
        ),
        ({"id": "count-2", "conversations": Q}, "image_count"),  # <image> but no image
        (
            {"id": "empty-conv", "image": "coco/train2017/000000000009.jpg", "conversations": []},
            "malformed",
        ),
        ({"id": "not-alternating", "conversations": [{"from": "gpt", "value": "hi"}]}, "malformed"),
        ({"id": "bad-image-field", "image": 7, "conversations": Q}, "malformed"),
        ({"id": "no-answer", "conversations": conv_of("Hello?", "   ")}, "no_assistant"),
    ]
    records = []
    # Interleave so skips land in several shards.
    for i in range(max(len(good), len(bad))):
        if i < len(good):
            records.append(good[i])
        if i < len(bad):
            records.append(bad[i][0])
    records.append("not an object")
    ann = tmp_path / "llava_v1_5_mix665k.json"
    ann.write_text(json.dumps(records))
    expected_skips = {r["id"]: reason for r, reason in bad} | {None: "malformed"}
    return {
        "root": tmp_path,
        "json": ann,
        "images": img,
        "records": records,
        "good": good,
        "skips": expected_skips,
    }


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def run(args: list[str], main=llava_main) -> int:
    return main([*args, "--no-progress"])


def test_converts_every_kind_of_record_and_reports_the_rest(dataset, tmp_path, capsys):
    out = tmp_path / "shards"
    before = sorted(p for p in tmp_path.rglob("*") if out not in p.parents)
    rc = run(
        [
            "--json",
            str(dataset["json"]),
            "--images",
            str(dataset["images"]),
            "--out",
            str(out),
            "--samples-per-shard",
            "4",
            "--workers",
            "2",
        ]
    )
    assert rc == 0
    assert "preset: llava_mix665k" in capsys.readouterr().err  # detected from the exact file name

    manifest = read_manifest(out / "manifest.json")
    report = json.loads((out / "report.json").read_text())
    n_records = len(dataset["records"])
    assert report["records"] == n_records
    assert report["written"] == len(dataset["good"]) == manifest["num_samples"]
    assert report["skipped"] == dict(Counter(dataset["skips"].values()))
    assert {(s["id"], s["reason"]) for s in report["skipped_records"]} == set(
        dataset["skips"].items()
    )
    assert all(s["detail"] and isinstance(s["index"], int) for s in report["skipped_records"])
    # Indices point at the annotation file's records.
    for s in report["skipped_records"]:
        rec = dataset["records"][s["index"]]
        assert (rec.get("id") if isinstance(rec, dict) else None) == s["id"]

    # Shards read back: the manifest's per-sample counts match the tars, in tar order.
    seen = {}
    for entry in manifest["shards"]:
        samples = read_shard(out / entry["path"])
        assert entry["num_samples"] == len(samples)
        for key, tokens, n_img in zip(sorted(samples), entry["tokens"], entry["images"]):
            members = samples[key]
            meta = json.loads(members["json"])
            images = sorted(e for e in members if e != "json")
            assert len(images) == n_img
            text = "\n".join(t["value"].replace("<image>", " ") for t in meta["conversations"])
            assert tokens == estimate_tokens(text)
            for e in images:
                Image.open(io.BytesIO(members[e])).load()
            seen[meta["id"]] = images
    assert set(seen) == {r["id"] for r in dataset["good"]}
    assert seen["sharegpt-1"] == []  # text-only: no dummy image
    assert seen["multi-1"] == ["000.jpg", "001.png"]  # both images, in annotation order
    assert seen["ocr-1"] == ["000.gif"]  # found behind the .jpg name, stored as what it is
    assert manifest["num_text_only"] == 1 and manifest["num_images"] == 6
    assert manifest["tokens"]["method"] == "words"
    # Only the output folder changed.
    after = sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    assert after == before


def test_member_names_cannot_escape(dataset, tmp_path):
    out = tmp_path / "deep" / "shards"
    convert(
        dataset["json"],
        dataset["images"],
        out,
        preset="llava_mix665k",
        samples_per_shard=100,
        progress=False,
    )
    (shard,) = out.glob("shard-*.tar")
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    assert all("/" not in n and ".." not in n and not n.startswith(".") for n in names)
    evil = [n for n in names if "evil" in n]
    assert evil and all(n.split(".", 1)[0] == sample_key(10, "../../evil") for n in evil)
    assert (
        sample_key(3, "../../x") == "000000003_x"
        and sample_key(4, "a/b.c d") == "000000004_a_b_c_d"
    )
    assert sample_key(5, "../..") == "000000005"
    # The id itself is kept, verbatim, inside the json member.
    assert json.loads(read_shard(shard)[evil[0].split(".", 1)[0]]["json"])["id"] == "../../evil"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()


def test_resume_redoes_only_unfinished_shards_and_output_is_deterministic(
    dataset, tmp_path, monkeypatch
):
    args = dict(preset="llava_mix665k", samples_per_shard=3, progress=False)
    a = tmp_path / "a"
    convert(dataset["json"], dataset["images"], a, workers=1, **args)
    shards = sorted(p.name for p in a.glob("shard-*.tar"))
    original = {name: (a / name).read_bytes() for name in shards}
    manifest = (a / "manifest.json").read_text()

    # Interrupt: shard 2 lost its progress record, shard 4 is half written.
    (a / ".convert" / "shard-000002.json").unlink()
    (a / shards[3]).write_bytes(original[shards[3]][:1000])
    calls = []
    real = conv.convert_shard
    monkeypatch.setattr(conv, "convert_shard", lambda task: calls.append(task[0]) or real(task))
    convert(dataset["json"], dataset["images"], a, workers=1, **args)
    assert sorted(calls) == sorted({2, int(shards[3][6:12])})
    assert {n: (a / n).read_bytes() for n in shards} == original
    assert (a / "manifest.json").read_text() == manifest

    # A finished conversion reruns nothing; more workers give the same bytes.
    calls.clear()
    convert(dataset["json"], dataset["images"], a, workers=1, **args)
    assert calls == []
    b = tmp_path / "b"
    monkeypatch.setattr(conv, "convert_shard", real)
    convert(dataset["json"], dataset["images"], b, workers=2, **args)
    assert {n: (b / n).read_bytes() for n in shards} == original
    assert not list(a.glob("*.tmp")) and not list((a / ".convert").glob("*.tmp"))


def test_two_equal_conversions_write_byte_identical_reports(dataset, tmp_path):
    """The report holds only what the inputs determine: no object repr with a memory address
    (the junk file PIL cannot identify), no timing."""
    args = dict(preset="llava_mix665k", samples_per_shard=3, progress=False, workers=1)
    convert(dataset["json"], dataset["images"], tmp_path / "a", **args)
    convert(dataset["json"], dataset["images"], tmp_path / "b", **args)
    first, second = ((tmp_path / d / "report.json").read_bytes() for d in "ab")
    assert first == second
    junk = next(s for s in json.loads(first)["skipped_records"] if s["id"] == "junk")
    assert junk["reason"] == "image_decode" and "junk.jpg" in junk["detail"]
    assert " at 0x" not in first.decode()


def test_changed_settings_are_refused_unless_overwrite(dataset, tmp_path, capsys):
    out = tmp_path / "s"
    base = [
        "--json",
        str(dataset["json"]),
        "--images",
        str(dataset["images"]),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    assert run(base + ["--samples-per-shard", "4"]) == 0
    assert run(base + ["--samples-per-shard", "5"]) == 2
    err = capsys.readouterr().err
    assert "differs in: samples_per_shard" in err and "--overwrite" in err
    assert run(base + ["--samples-per-shard", "5", "--overwrite"]) == 0
    manifest = read_manifest(out / "manifest.json")
    assert (
        manifest["source"]["samples_per_shard"] == 5
        and max(s["num_samples"] for s in manifest["shards"]) <= 5
    )
    # Shard names follow record positions: records 15..17 -> shard 3 (a shard whose records were all
    # skipped is simply absent).
    assert {s["path"] for s in manifest["shards"]} <= {f"shard-{k:06d}.tar" for k in range(4)}
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(
        s["path"] for s in manifest["shards"]
    )
    # Someone else's shards in --out are not silently replaced.
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard-000000.tar").write_bytes(b"theirs")
    assert run(base[:4] + ["--out", str(other)]) == 2
    assert "no conversion state" in capsys.readouterr().err
    assert (other / "shard-000000.tar").read_bytes() == b"theirs"


def test_nothing_usable_exits_non_zero_with_a_report(tmp_path, capsys):
    ann = tmp_path / "mine.json"
    ann.write_text(
        json.dumps(
            [{"id": "a", "image": "x.jpg", "conversations": Q}, {"id": "b", "conversations": []}]
        )
    )
    (tmp_path / "img").mkdir()
    out = tmp_path / "out"
    assert run(["--json", str(ann), "--images", str(tmp_path / "img"), "--out", str(out)]) == 1
    assert "no usable record" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == {"image_missing": 1, "malformed": 1}
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-*.tar"))


def test_bad_options_exit_2_naming_the_option(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    assert (
        run(
            [
                "--json",
                str(tmp_path / "none.json"),
                "--images",
                str(tmp_path / "img"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--json" in capsys.readouterr().err
    ann = tmp_path / "obj.json"
    ann.write_text('{"not": "a list"}')
    assert (
        run(["--json", str(ann), "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "expected a JSON list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run(
            [
                "--json",
                str(ann),
                "--images",
                str(tmp_path / "img"),
                "--out",
                str(tmp_path / "o"),
                "--preset",
                "llava665",
            ]
        )
    assert info.value.code == 2 and "invalid choice: 'llava665'" in capsys.readouterr().err


def test_presets_are_chosen_by_exact_file_name():
    assert detect_preset("llava_v1_5_mix665k.json", "llava") == "llava_mix665k"
    assert detect_preset("blip_laion_cc_sbu_558k.json", "llava") == "llava_pretrain"
    assert detect_preset("share-captioner_coco_lcs_sam_1246k_1107.json", "llava") == "sharegpt4v_pt"
    assert (
        detect_preset("sharegpt4v_instruct_gpt4-vision_cap100k.json", "llava")
        == "sharegpt4v_cap100k"
    )
    assert (
        detect_preset("sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json", "llava")
        == "sharegpt4v_mix665k"
    )
    assert detect_preset("my_llava_v1_5_mix665k.json", "llava") == "llava"  # no substring matching
    assert set(PRESETS.names()) == {
        "llava",
        "llava_pretrain",
        "llava_mix665k",
        "sharegpt4v_pt",
        "sharegpt4v_cap100k",
        "sharegpt4v_mix665k",
    }


def test_sharegpt4v_prefixes_map_to_other_folders(tmp_path):
    """ShareGPT4V names LCS images llava/llava_pretrain/images/...; --image-dir points that
    prefix at wherever LLaVA-Pretrain was unpacked."""
    data = tmp_path / "data"
    (data / "coco" / "train2017").mkdir(parents=True)
    (data / "coco" / "train2017" / "1.jpg").write_bytes(image_bytes("JPEG"))
    lcs = tmp_path / "LLaVA-Pretrain" / "images" / "00000"
    lcs.mkdir(parents=True)
    (lcs / "000000010.jpg").write_bytes(image_bytes("JPEG", (0, 0, 255)))
    recs = [
        {"id": "c", "image": "coco/train2017/1.jpg", "conversations": Q},
        {"id": "l", "image": "llava/llava_pretrain/images/00000/000000010.jpg", "conversations": Q},
    ]
    ann = tmp_path / "sharegpt4v_instruct_gpt4-vision_cap100k.json"
    ann.write_text(json.dumps(recs))
    out = tmp_path / "out"
    rc = sharegpt4v_main(
        [
            "--json",
            str(ann),
            "--images",
            str(data),
            "--out",
            str(out),
            "--no-progress",
            "--image-dir",
            f"llava/llava_pretrain/images={lcs.parent}",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 2 and report["preset"] == "sharegpt4v_cap100k"
    # Without the mapping the LCS image is reported missing, with the path it was looked for.
    rc = sharegpt4v_main(
        ["--json", str(ann), "--images", str(data), "--out", str(tmp_path / "o2"), "--no-progress"]
    )
    report = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert rc == 0 and report["skipped"] == {"image_missing": 1}
    assert (
        "llava/llava_pretrain/images/00000/000000010.jpg" in report["skipped_records"][0]["detail"]
    )


def test_token_counts_with_a_tokenizer_and_max_tokens(dataset, tmp_path, tiny_models, tokenizer):
    out = tmp_path / "tok"
    report = convert(
        dataset["json"],
        dataset["images"],
        out,
        preset="llava_mix665k",
        tokenizer=str(tiny_models["llm"]),
        max_tokens=40,
        image_tokens=16,
        progress=False,
    )
    manifest = read_manifest(out / "manifest.json")
    assert manifest["tokens"] == {"method": "tokenizer", "tokenizer": str(tiny_models["llm"])}
    kept = {}
    for entry in manifest["shards"]:
        for key, tokens in zip(sorted(read_shard(out / entry["path"])), entry["tokens"]):
            meta = json.loads(read_shard(out / entry["path"])[key]["json"])
            kept[meta["id"]] = tokens
            text = "\n".join(t["value"].replace("<image>", " ") for t in meta["conversations"])
            assert tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Expected from the records themselves: text tokens + 16 per image over 40 is overlong.
    too_long = set()
    for rec in dataset["good"]:
        text = "\n".join(t["value"].replace("<image>", " ") for t in rec["conversations"])
        n_img = len(rec["image"]) if isinstance(rec.get("image"), list) else int("image" in rec)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 16 * n_img > 40:
            too_long.add(rec["id"])
    assert "multi-1" in too_long and len(too_long) < len(
        dataset["good"]
    )  # the limit bites, not everywhere
    assert {s["id"] for s in report["skipped_records"] if s["reason"] == "overlong"} == too_long
    assert set(kept) == {r["id"] for r in dataset["good"]} - too_long


def test_jsonl_input_with_a_broken_line(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.png").write_bytes(image_bytes("PNG"))
    lines = [
        json.dumps({"id": "a", "image": "a.png", "conversations": Q}),
        "{broken",
        json.dumps({"id": "t", "conversations": conv_of("hi", "hello")}),
    ]
    ann = tmp_path / "data.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    report = convert(ann, img, tmp_path / "o", progress=False)
    assert report["written"] == 2 and report["skipped"] == {"malformed": 1}
    assert report["skipped_records"][0]["index"] == 1


def test_help_and_module_entry_points(capsys):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    # The real entry point once, as a user types it (and without importing torch: it starts fast).
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "data_prep.llava", "--help"],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "--samples-per-shard" in proc.stdout
        and "--workers" in proc.stdout
        and "sharegpt4v_pt" in proc.stdout
    )
    assert not re.search(
        r"\|\s+torch\s*$", proc.stderr, re.M
    )  # importtime lists every module imported
    assert re.search(r"\|\s+data_prep.convert\s*$", proc.stderr, re.M)
    with pytest.raises(SystemExit) as info:
        sharegpt4v_main(["--help"])
    assert info.value.code == 0 and "python -m data_prep.sharegpt4v" in capsys.readouterr().out


def test_converted_shards_feed_the_datamodule(dataset, tmp_path, processor_for_convert):
    """Converter output is what training reads: text-only and multi-image samples encode,
    and length grouping takes its lengths from the manifest."""
    from lmm.data.datamodule import LMMDataModule
    from lmm.data.mixing import MixIndex, ShardSet

    out = tmp_path / "shards"
    convert(
        dataset["json"],
        dataset["images"],
        out,
        preset="llava_mix665k",
        samples_per_shard=2,
        progress=False,
    )
    pattern = str(out / "shard-*.tar")
    index = MixIndex([ShardSet(pattern)], need_tokens=True)
    manifest = read_manifest(out / "manifest.json")
    assert index.tokens.tolist() == [t for s in manifest["shards"] for t in s["tokens"]]
    assert index.images.tolist() == [n for s in manifest["shards"] for n in s["images"]]

    proc = processor_for_convert
    dm = LMMDataModule(
        train=[pattern],
        template="vicuna",
        batch_size=2,
        num_workers=0,
        max_length=256,
        group_by_length=True,
        group_window=2,
        processor=proc,
    )
    rows = {}
    for batch in dm.train_dataloader():
        assert batch["skipped"] == {}
        for r, sid in enumerate(batch["ids"]):
            rows[sid] = (
                int((batch["input_ids"][r] == proc.image_token_id).sum()) // proc.num_image_tokens
            )
        assert batch["pixel_values"].shape[0] == sum(rows[s] for s in batch["ids"])
    assert rows == {
        "coco-1": 1,
        "sharegpt-1": 0,
        "gqa-1": 1,
        "ocr-1": 1,
        "multi-1": 2,
        "../../evil": 1,
    }


@pytest.fixture
def processor_for_convert(lmm_model):
    from lmm.data.encode import Processor

    m = lmm_model
    return Processor(m.tokenizer, m.vision.image_spec, m.num_image_tokens, m.image_token_id)


# -- every public schema, every image format and mode ----------------------------------------------------------
#
# Small annotation files in the layout of each public dataset (exact file names, so --preset auto
# picks the preset), over real image files of odd sizes in every format and mode the converters
# meet, plus one record per problem kind. Each image is one flat colour, so after conversion and
# the training pipeline (SampleEncoder via the DataModule) the centre of its tensor must show the
# colour the tower should see.


@dataclass(frozen=True)
class Variant:
    """One image file: how it is written and what the tower must see."""

    fmt: str  # PIL format written
    mode: str  # PIL mode drawn
    size: tuple[int, int]
    colour: Any  # pixel value in ``mode``
    rgb: tuple[int, int, int]  # the colour as 8-bit RGB, before transparency
    opens_as: tuple[str, ...]  # the mode(s) PIL decodes it to (guards the test against PIL changes)
    stored: str  # member extension in the shard
    alpha: int = 255  # opacity: transparent pixels become the tower's fill colour
    lossy: bool = False
    save: tuple[tuple[str, Any], ...] = ()
    frames: tuple[
        tuple[int, int, int], ...
    ] = ()  # more frames (animated GIF: only the first counts)


def _cmyk(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    return tuple(round((255 - v) * (255 - k) / 255) for v in (c, m, y))  # type: ignore[return-value]


PALETTE = [0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50] + [0] * (256 * 3 - 12)
VARIANTS = {
    "rgb.jpg": Variant(
        "JPEG", "RGB", (37, 53), (200, 30, 30), (200, 30, 30), ("RGB",), "jpg", lossy=True
    ),
    "grey.jpg": Variant("JPEG", "L", (53, 37), 77, (77, 77, 77), ("L",), "jpg", lossy=True),
    "cmyk.jpg": Variant(
        "JPEG",
        "CMYK",
        (45, 29),
        (10, 200, 90, 40),
        _cmyk(10, 200, 90, 40),
        ("CMYK",),
        "jpg",
        lossy=True,
    ),
    "progressive.jpg": Variant(
        "JPEG",
        "RGB",
        (61, 29),
        (20, 120, 220),
        (20, 120, 220),
        ("RGB",),
        "jpg",
        lossy=True,
        save=(("progressive", True),),
    ),
    "rgb.png": Variant("PNG", "RGB", (37, 53), (12, 34, 56), (12, 34, 56), ("RGB",), "png"),
    "rgba.png": Variant(
        "PNG", "RGBA", (53, 37), (200, 30, 30, 128), (200, 30, 30), ("RGBA",), "png", alpha=128
    ),
    "grey.png": Variant("PNG", "L", (29, 45), 201, (201, 201, 201), ("L",), "png"),
    "palette.png": Variant("PNG", "P", (37, 53), 3, (200, 100, 50), ("P",), "png"),
    "grey16.png": Variant(
        "PNG", "I;16", (37, 53), 40000, (156, 156, 156), ("I;16", "I"), "png"
    ),  # 40000*255/65535
    "greyalpha.png": Variant(
        "PNG", "LA", (33, 47), (90, 64), (90, 90, 90), ("LA",), "png", alpha=64
    ),
    "bilevel.png": Variant("PNG", "1", (37, 53), 1, (255, 255, 255), ("1",), "png"),
    "palette.gif": Variant("GIF", "P", (53, 37), 3, (200, 100, 50), ("P",), "gif"),
    "transparent.gif": Variant(
        "GIF", "P", (37, 53), 1, (10, 20, 30), ("P",), "gif", alpha=0, save=(("transparency", 1),)
    ),
    "animated.gif": Variant(
        "GIF",
        "RGB",
        (45, 45),
        (200, 30, 30),
        (200, 30, 30),
        ("P", "RGB"),
        "gif",
        frames=((30, 200, 30),),
    ),
    "rgb.webp": Variant(
        "WEBP",
        "RGB",
        (37, 53),
        (12, 34, 56),
        (12, 34, 56),
        ("RGB",),
        "webp",
        save=(("lossless", True),),
    ),
    "rgb.bmp": Variant("BMP", "RGB", (53, 37), (90, 160, 20), (90, 160, 20), ("RGB",), "bmp"),
    "rgb.tiff": Variant("TIFF", "RGB", (37, 53), (160, 20, 90), (160, 20, 90), ("RGB",), "tiff"),
    "rgb.ppm": Variant(
        "PPM", "RGB", (53, 37), (20, 90, 160), (20, 90, 160), ("RGB",), "png"
    ),  # re-encoded as PNG
}


def variant_bytes(name: str) -> bytes:
    v = VARIANTS[name]
    img = Image.new(v.mode, v.size, v.colour)
    if v.mode == "P":
        img.putpalette(PALETTE)
    kw = dict(v.save)
    if v.frames:
        kw.update(
            save_all=True,
            append_images=[Image.new(v.mode, v.size, c) for c in v.frames],
            duration=100,
        )
    buf = io.BytesIO()
    img.save(buf, format=v.fmt, **kw)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == v.fmt and check.mode in v.opens_as and check.size == v.size, (
            name,
            check.mode,
        )
    return data


def turns(*values: str) -> list[dict]:
    return conv_of(*values)


@dataclass
class Schema:
    """One annotation file in a public layout, its image folder(s) and what conversion must give."""

    file: str
    preset: str
    main: Any
    images: dict[str, str | bytes]  # path under the image root -> variant name (or raw bytes)
    records: list[dict]
    problems: dict[str, str]  # record id -> skip reason
    args: tuple[str, ...] = ()
    extra_roots: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # --image-dir prefix -> its files

    def kept(self) -> dict[str, list[str]]:
        """id -> variant names of its images, for the records that must be converted."""
        files = {
            **self.images,
            **{f"{p}/{rel}": v for p, sub in self.extra_roots.items() for rel, v in sub.items()},
        }
        out = {}
        for rec in self.records:
            if rec["id"] in self.problems:
                continue
            paths = rec.get("image", [])
            paths = [paths] if isinstance(paths, str) else paths
            out[rec["id"]] = [files[_on_disk(p, files)] for p in paths]
        return out


def _on_disk(path: str, files: dict) -> str:
    """The file a record's path resolves to (OCR-VQA: the same name with the real extension)."""
    if path in files:
        return path
    stem = path.rsplit(".", 1)[0]
    (found,) = [f for f in files if f.rsplit(".", 1)[0] == stem]
    return found


JPEG_CUT = variant_bytes("rgb.jpg")[:300]
JUNK = bytes(range(256)) * 4


def public_schemas() -> dict[str, Schema]:
    caption = (
        "A red square sits on a plain grey background with soft light and no other objects in view."
    )
    sharegpt = turns(
        "What is the capital of France?",
        "The capital of France is Paris.",
        "And how many people live there?",
        "About two million people live in the city itself.",
    )
    return {
        "llava_pretrain": Schema(
            "blip_laion_cc_sbu_558k.json",
            "llava_pretrain",
            llava_main,
            images={
                "00000/000000012.jpg": "rgb.jpg",
                "00000/000000019.jpg": "grey.jpg",
                "00001/000010034.jpg": "cmyk.jpg",
                "00001/000010087.jpg": "progressive.jpg",
                "00002/000020001.jpg": "rgb.png",
            },  # PNG bytes behind a .jpg name (LAION has those)
            records=[
                {
                    "id": "000000012",
                    "image": "00000/000000012.jpg",
                    "conversations": turns(
                        "Render a clear and concise summary of the photo.\n<image>", "a red wall"
                    ),
                },
                {
                    "id": "000000019",
                    "image": "00000/000000019.jpg",
                    "conversations": turns(
                        "<image>\nWrite a terse but informative summary of the picture.",
                        "grey concrete texture",
                    ),
                },
                {
                    "id": "000010034",
                    "image": "00001/000010034.jpg",
                    "conversations": turns(
                        "Give a brief description of the image.\n<image>", "a poster in cmyk"
                    ),
                },
                {
                    "id": "000010087",
                    "image": "00001/000010087.jpg",
                    "conversations": turns(
                        "<image>\nShare a concise interpretation of the image provided.",
                        "blue sky over the sea",
                    ),
                },
                {
                    "id": "000020001",
                    "image": "00002/000020001.jpg",
                    "conversations": turns(
                        "Describe the image concisely.\n<image>", "a dark blue gradient"
                    ),
                },
                {
                    "id": "000030000",
                    "image": "00003/000030000.jpg",
                    "conversations": turns(
                        "Describe the image concisely.\n<image>", "never downloaded"
                    ),
                },
            ],
            problems={"000030000": "image_missing"},
        ),
        "llava_mix665k": Schema(
            "llava_v1_5_mix665k.json",
            "llava_mix665k",
            llava_main,
            images={
                "coco/train2017/000000033471.jpg": "rgb.jpg",
                "gqa/images/2354786.jpg": "grey.jpg",
                "ocr_vqa/images/71292377.gif": "palette.gif",
                "ocr_vqa/images/140031996X.png": "palette.png",
                "textvqa/train_images/0a0bc91825468c45.jpg": "progressive.jpg",
                "vg/VG_100K/2356347.jpg": "cmyk.jpg",
                "vg/VG_100K_2/1592.jpg": "grey16.png",
                "textvqa/train_images/cut.jpg": JPEG_CUT,
                "vg/VG_100K_2/junk.jpg": JUNK,
                "vg/VG_100K_2/empty.jpg": b"",
            },
            records=[
                {
                    "id": "000000033471",
                    "image": "coco/train2017/000000033471.jpg",
                    "conversations": turns(
                        "<image>\nWhat are the colors of the bus in the image?",
                        "The bus in the image is white and red.",
                        "What feature can be seen on the back of the bus?",
                        "The back of the bus features an advertisement.",
                    ),
                },
                {"id": "i6IyJda_0", "model": "", "conversations": sharegpt},  # text-only ShareGPT
                {
                    "id": "2354786",
                    "image": "gqa/images/2354786.jpg",
                    "conversations": turns(
                        "<image>\nIs the sky blue or white?\nAnswer the question using a single word or phrase.",
                        "White",
                    ),
                },
                {
                    "id": "71292377",
                    "image": "ocr_vqa/images/71292377.jpg",
                    "conversations": turns(  # a .gif on disk
                        "<image>\nWho wrote this book?",
                        "Sandra Boynton",
                        "What is the title of this book?",
                        "Moo, Baa, La La La!",
                        "Is this a child related book?",
                        "Yes",
                    ),
                },
                {
                    "id": "140031996X",
                    "image": "ocr_vqa/images/140031996X.jpg",
                    "conversations": turns(  # a .png
                        "<image>\nWhat is the genre of this book?", "Travel"
                    ),
                },
                {
                    "id": "0a0bc91825468c45",
                    "image": "textvqa/train_images/0a0bc91825468c45.jpg",
                    "conversations": turns(
                        "<image>\nwhat is the brand of this camera?\nReference OCR token: Canon",
                        "canon",
                    ),
                },
                {
                    "id": "VG_2356347",
                    "image": "vg/VG_100K/2356347.jpg",
                    "conversations": turns(
                        "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: "
                        "man in red shirt.",
                        "[0.35, 0.47, 0.6, 0.9]",
                    ),
                },
                {
                    "id": "VG_1592",
                    "image": "vg/VG_100K_2/1592.jpg",
                    "conversations": turns(
                        "<image>\nPlease provide a short description for this region: [0.1, 0.2, 0.5, 0.6]",
                        "grey sky",
                    ),
                },
                # One record per problem kind.
                {"id": "missing", "image": "coco/train2017/000000999999.jpg", "conversations": Q},
                {"id": "truncated", "image": "textvqa/train_images/cut.jpg", "conversations": Q},
                {"id": "corrupt", "image": "vg/VG_100K_2/junk.jpg", "conversations": Q},
                {"id": "empty-file", "image": "vg/VG_100K_2/empty.jpg", "conversations": Q},
                {
                    "id": "count",
                    "image": "coco/train2017/000000033471.jpg",
                    "conversations": turns("<image>\n<image>\nCompare them.", "They are the same."),
                },
                {
                    "id": "empty-conversation",
                    "image": "gqa/images/2354786.jpg",
                    "conversations": [],
                },
                {
                    "id": "malformed-conversation",
                    "conversations": [
                        {"from": "human", "value": "Hi"},
                        {"from": "bot", "value": "Hello"},
                    ],
                },
                {"id": "empty-answer", "conversations": turns("Anything?", "  ")},
                {
                    "id": "overlong",
                    "image": "coco/train2017/000000033471.jpg",
                    "conversations": turns(
                        "<image>\nDescribe the image in detail.", " ".join(["word"] * 200)
                    ),
                },
            ],
            problems={
                "missing": "image_missing",
                "truncated": "image_decode",
                "corrupt": "image_decode",
                "empty-file": "image_decode",
                "count": "image_count",
                "empty-conversation": "malformed",
                "malformed-conversation": "malformed",
                "empty-answer": "no_assistant",
                "overlong": "overlong",
            },
            args=("--max-tokens", "200", "--image-tokens", "16"),  # 200 words ~ 260 tokens
        ),
        "sharegpt4v_cap100k": Schema(
            "sharegpt4v_instruct_gpt4-vision_cap100k.json",
            "sharegpt4v_cap100k",
            sharegpt4v_main,
            images={
                "coco/train2017/000000000009.jpg": "rgb.jpg",
                "sam/images/sa_1002.jpg": "cmyk.jpg",
                "wikiart/images/claude-monet_water-lilies-1916.jpg": "progressive.jpg",
                "web-celebrity/images/Tom_Hanks_54745.jpg": "grey.jpg",
                "web-landmark/images/Eiffel_Tower_50.png": "rgba.png",
                "share_textvqa/images/0a1b2c3d.jpg": "grey16.png",
                "sam/images/sa_9999.jpg": JPEG_CUT,
            },
            extra_roots={"llava/llava_pretrain/images": {"00000/000000010.jpg": "grey.png"}},
            records=[
                {
                    "id": i,
                    "image": path,
                    "conversations": turns(
                        f"{prompt}\n<image>" if n % 2 else f"<image>\n{prompt}", caption
                    ),
                }
                for n, (i, path, prompt) in enumerate(
                    [
                        (
                            "000000000009",
                            "coco/train2017/000000000009.jpg",
                            "What do you see happening in this image?",
                        ),
                        (
                            "sa_1002",
                            "sam/images/sa_1002.jpg",
                            "Analyze the image in a comprehensive and detailed manner.",
                        ),
                        (
                            "wikiart_1",
                            "wikiart/images/claude-monet_water-lilies-1916.jpg",
                            "Describe this painting.",
                        ),
                        (
                            "Tom_Hanks_54745",
                            "web-celebrity/images/Tom_Hanks_54745.jpg",
                            "Who is this person?",
                        ),
                        (
                            "Eiffel_Tower_50",
                            "web-landmark/images/Eiffel_Tower_50.png",
                            "Where was this taken?",
                        ),
                        (
                            "0a1b2c3d",
                            "share_textvqa/images/0a1b2c3d.jpg",
                            "What does the text say?",
                        ),
                        (
                            "000000010",
                            "llava/llava_pretrain/images/00000/000000010.jpg",
                            "Describe the image.",
                        ),
                        ("sa_9999", "sam/images/sa_9999.jpg", "Describe the image."),
                    ]
                )
            ],
            problems={"sa_9999": "image_decode"},
        ),
        "sharegpt4v_mix665k": Schema(
            "sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json",
            "sharegpt4v_mix665k",
            sharegpt4v_main,
            images={
                "coco/train2017/000000000139.jpg": "rgb.jpg",
                "llava/llava_pretrain/images/00013/000131470.jpg": "palette.png",
                "sam/images/sa_10000.jpg": "grey.jpg",
                "ocr_vqa/images/0385.gif": "transparent.gif",
            },
            records=[
                {
                    "id": "000000000139",
                    "image": "coco/train2017/000000000139.jpg",
                    "conversations": turns(
                        "<image>\nAnalyze the image in a comprehensive and detailed manner.",
                        caption,
                    ),
                },
                {
                    "id": "000131470",
                    "image": "llava/llava_pretrain/images/00013/000131470.jpg",
                    "conversations": turns("What is this photo about?\n<image>", caption),
                },
                {
                    "id": "sa_10000",
                    "image": "sam/images/sa_10000.jpg",
                    "conversations": turns("<image>\nDescribe the image.", caption),
                },
                {
                    "id": "0385",
                    "image": "ocr_vqa/images/0385.jpg",
                    "conversations": turns("<image>\nWho is the author of this book?", "Unknown"),
                },
                {"id": "oBVsg5v_0", "conversations": sharegpt},
                {
                    "id": "no-marker",
                    "image": "sam/images/sa_10000.jpg",
                    "conversations": turns("Describe the image.", caption),
                },
            ],
            problems={"no-marker": "image_count"},
        ),
        "multi_image": Schema(
            "my_interleaved.json",
            "llava",
            llava_main,
            images={
                "a.png": "greyalpha.png",
                "b.png": "bilevel.png",
                "c.gif": "animated.gif",
                "d.webp": "rgb.webp",
                "e.bmp": "rgb.bmp",
                "f.tiff": "rgb.tiff",
                "g.ppm": "rgb.ppm",
                "h.png": "rgba.png",
            },
            records=[
                {
                    "id": "pair",
                    "image": ["a.png", "b.png"],
                    "conversations": turns(
                        "<image>\n<image>\nWhich image is darker?", "The first one."
                    ),
                },
                {
                    "id": "interleaved",
                    "image": ["c.gif", "d.webp", "e.bmp"],
                    "conversations": turns(
                        "<image>\nWhat colour is this?",
                        "Red.",
                        "And these? <image> <image>",
                        "Dark blue and green.",
                    ),
                },
                {
                    "id": "triple",
                    "image": ["f.tiff", "g.ppm", "h.png"],
                    "conversations": turns(
                        "Compare <image>, <image> and <image>.", "All three differ."
                    ),
                },
                {
                    "id": "one-in-a-list",
                    "image": ["h.png"],
                    "conversations": turns("<image>\nColour?", "Red."),
                },
                {
                    "id": "three-for-two",
                    "image": ["a.png", "b.png", "c.gif"],
                    "conversations": turns("<image>\n<image>\nCompare.", "Same."),
                },
            ],
            problems={"three-for-two": "image_count"},
        ),
    }


SCHEMAS = public_schemas()


def write_schema(root: Path, s: Schema) -> tuple[Path, Path, list[str]]:
    """Write the images and the annotation file under ``root``; returns (json, images, extra CLI args)."""
    images = root / "images"
    extra: list[str] = []
    roots = [(images, s.images)]
    for prefix, files in s.extra_roots.items():
        folder = root / f"elsewhere-{len(extra)}"
        roots.append((folder, files))
        extra += ["--image-dir", f"{prefix}={folder}"]
    for folder, files in roots:
        for rel, what in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(what if isinstance(what, bytes) else variant_bytes(what))
    ann = root / s.file
    ann.write_text(json.dumps(s.records))
    return ann, images, extra


def test_public_schemas_cover_every_image_variant_and_problem_kind():
    kept = {v for s in SCHEMAS.values() for names in s.kept().values() for v in names}
    assert kept == set(VARIANTS)
    reasons = {r for s in SCHEMAS.values() for r in s.problems.values()}
    assert reasons == {
        "image_missing",
        "image_decode",
        "image_count",
        "malformed",
        "no_assistant",
        "overlong",
    }
    assert {s.preset for s in SCHEMAS.values()} == {
        "llava",
        "llava_pretrain",
        "llava_mix665k",
        "sharegpt4v_cap100k",
        "sharegpt4v_mix665k",
    }


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_public_schema_converts_and_every_image_reaches_the_tower_as_rgb(
    name, tmp_path, capsys, processor_for_convert
):
    from lmm.data.datamodule import LMMDataModule

    s = SCHEMAS[name]
    ann, images, extra = write_schema(tmp_path / "src", s)
    out = tmp_path / "shards"
    rc = run(
        [
            "--json",
            str(ann),
            "--images",
            str(images),
            "--out",
            str(out),
            "--samples-per-shard",
            "3",
            "--workers",
            "2",
            *s.args,
            *extra,
        ],
        main=s.main,
    )
    assert rc == 0
    assert f"preset: {s.preset} " in capsys.readouterr().err

    # report.json names every problem record with its index, id, reason and a detail.
    report = json.loads((out / "report.json").read_text())
    kept = s.kept()
    assert report["records"] == len(s.records) and report["written"] == len(kept)
    assert {r["id"]: r["reason"] for r in report["skipped_records"]} == s.problems
    assert len(report["skipped_records"]) == len(s.problems)
    for r in report["skipped_records"]:
        assert s.records[r["index"]]["id"] == r["id"] and r["detail"]
    assert report["skipped"] == dict(Counter(s.problems.values()))

    # The shards hold each image's bytes as found (members named by format), in annotation order.
    members = {}
    for shard in sorted(out.glob("shard-*.tar")):
        for key, m in read_shard(shard).items():
            members[json.loads(m["json"])["id"]] = m
    assert set(members) == set(kept)
    for sid, names in kept.items():
        exts = sorted(e for e in members[sid] if e != "json")
        assert exts == [f"{i:03d}.{VARIANTS[v].stored}" for i, v in enumerate(names)], sid
        for ext, v in zip(exts, names):
            if VARIANTS[v].fmt != "PPM":
                assert members[sid][ext] == variant_bytes(v)

    # Through the training pipeline: every image becomes a [3, size, size] tensor of its colour.
    proc = processor_for_convert
    spec = proc.image_spec
    dm = LMMDataModule(
        train=[str(out / "shard-*.tar")],
        template="vicuna",
        batch_size=1,
        num_workers=0,
        max_length=2048,
        shuffle_buffer=0,
        processor=proc,
    )
    seen = {}
    for batch in dm.train_dataloader():
        assert batch["skipped"] == {}
        (sid,) = batch["ids"]
        seen[sid] = batch["pixel_values"]
        assert (
            int((batch["input_ids"] == proc.image_token_id).sum())
            == len(kept[sid]) * proc.num_image_tokens
        )
    assert set(seen) == set(kept)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    c = spec.size // 2
    for sid, pixels in seen.items():
        assert pixels.dtype == torch.float32 and pixels.shape == (
            len(kept[sid]),
            3,
            spec.size,
            spec.size,
        ), sid
        for v, x in zip(kept[sid], pixels):
            var = VARIANTS[v]
            a = var.alpha / 255
            want = torch.tensor([ch * a + f * (1 - a) for ch, f in zip(var.rgb, spec.fill)])
            got = ((x * std + mean) * 255)[:, c - 2 : c + 2, c - 2 : c + 2].mean(dim=(1, 2))
            tol = 4 if var.lossy else 1.5
            assert torch.allclose(got, want, atol=tol), (sid, v, got.tolist(), want.tolist())
