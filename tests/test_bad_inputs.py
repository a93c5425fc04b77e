"""Bad inputs at train and test time: one planted sample per kind, in a real tar shard, run
through ``lmm fit`` and ``lmm test``. Each is skipped with its reason, counted (TensorBoard
``skipped/<reason>``, test metrics), never a crash; too many stop the run with a report."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from conftest import json_bytes, png_bytes
from PIL import Image

from lmm.data.image import RGB_CONVERTIBLE_MODES, decode_image, to_rgb
from lmm.errors import SampleError
from lmm.train.cli import LMMCLI

QUESTION = "<image>\nWhat colour is it?"
BATCH = 4


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noisy_png(size: int = 32) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), "PNG")


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` (a decompression bomb's signature:
    a few bytes that would decode to gigabytes)."""
    data = bytearray(png_bytes(size=8))
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def unusual_modes() -> dict[str, bytes]:
    """Real files in modes other than RGB: each must decode and train, not be skipped."""
    transparent_p = Image.new("P", (16, 16), 3)
    return {
        "cmyk_jpeg": encoded(Image.new("CMYK", (16, 16), (10, 200, 30, 5)), "JPEG"),
        "i16_png": encoded(Image.new("I;16", (16, 16), 40000), "PNG"),
        "la_png": encoded(Image.new("LA", (16, 16), (90, 128)), "PNG"),
        "p_transparency_png": encoded(transparent_p, "PNG", transparency=3),
        "bilevel_bmp": encoded(Image.new("1", (16, 16), 1), "BMP"),
        "float_tiff": encoded(Image.new("F", (16, 16), 0.25), "TIFF"),
    }


def conversation(question: str = QUESTION, answer: str | None = "red") -> list[dict]:
    turns = [{"from": "human", "value": question}]
    return turns + ([{"from": "gpt", "value": answer}] if answer is not None else [])


# kind -> (json member, image member, skip reason at train time, at test time)
BAD = {
    "corrupt_image": (
        conversation(),
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "image_decode",
        "image_decode",
    ),
    "truncated_image": (conversation(), noisy_png()[:1500], "image_decode", "image_decode"),
    "empty_image": (conversation(), b"", "image_decode", "image_decode"),
    "decompression_bomb": (
        conversation(),
        png_claiming(12_000, 12_000),
        "image_too_large",
        "image_too_large",
    ),
    "no_assistant_turn": (
        conversation(answer=None),
        png_bytes(),
        "no_assistant",
        None,
    ),  # a fine test prompt
    "no_user_turn": (
        [{"from": "system", "value": "Be brief."}],
        None,
        "no_assistant",
        "malformed",
    ),  # no question
    "image_count_mismatch": (
        conversation("<image>\n<image>\nAnd these?"),
        png_bytes(),
        "image_count",
        "image_count",
    ),
    "overlong": (
        conversation("<image>\n" + "describe every detail " * 40),
        png_bytes(),
        "overlong",
        "overlong",
    ),
    "malformed_json": (None, png_bytes(), "malformed", "malformed"),
}
GOOD = 9


def write_bad_shard(path: Path) -> tuple[str, list[str]]:
    """One shard: every bad kind once, then every unusual mode once and GOOD plain samples (24
    in all, 6 training batches; the first two hold bad samples only). Returns the shard path
    and the sample keys in stored order (data.shuffle_buffer: 0 keeps it)."""
    samples = [(kind, conv, image) for kind, (conv, image, _, _) in BAD.items()]
    samples += [(kind, conversation(), image) for kind, image in unusual_modes().items()]
    samples += [(f"good_{i}", conversation(), png_bytes((20 * i, 90, 160))) for i in range(GOOD)]
    assert len(samples) % BATCH == 0
    with wds.TarWriter(str(path), encoder=False) as sink:
        for kind, conv, image in samples:
            meta = b"{not json" if conv is None else json_bytes({"id": kind, "conversations": conv})
            ext = {"cmyk_jpeg": "jpg", "bilevel_bmp": "bmp", "float_tiff": "tif"}.get(kind, "png")
            sink.write(
                {"__key__": kind, "json": meta, **({ext: image} if image is not None else {})}
            )
    return str(path), [s[0] for s in samples]


def write_config(tmp_path: Path, tiny_models, shard: str, **data) -> Path:
    cfg = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 24 // BATCH,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "bad"},
            },
        },
        "model": {
            "vision": {"name_or_path": str(tiny_models["vision"]), "feature_layer": -1},
            "llm": {"name_or_path": str(tiny_models["llm"])},
            "generation": {"max_new_tokens": 2},
            "results_dir": str(tmp_path / "results"),
        },
        "data": {
            "train": [shard],
            "test": [{"name": "bad", "shards": shard}],
            "template": "vicuna",
            "system_prompt": "",
            "max_length": 64,
            "batch_size": BATCH,
            "eval_batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 0,
            **data,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def last_scalars(log_dir: Path, prefix: str) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = log_dir.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        t[len(prefix) :]: acc.Scalars(t)[-1].value
        for t in acc.Tags()["scalars"]
        if t.startswith(prefix)
    }


def test_every_bad_kind_is_skipped_and_counted_in_fit_and_test(tmp_path, tiny_models):
    shard, keys = write_bad_shard(tmp_path / "shard-000000.tar")
    config = write_config(tmp_path, tiny_models, shard)
    train_expected = Counter(reason for _, _, reason, _ in BAD.values())
    test_expected = Counter(reason for _, _, _, reason in BAD.values() if reason)

    cli = LMMCLI(args=["fit", "--config", str(config)])
    assert cli.trainer.global_step == 24 // BATCH
    assert cli.model.skipped == train_expected
    seen = cli.datamodule.bad_samples("training")
    assert seen.seen == len(keys) and seen.skipped == train_expected  # every unusual mode trained
    assert last_scalars(tmp_path / "runs", "skipped/") == {
        k: float(v) for k, v in train_expected.items()
    }

    cli = LMMCLI(args=["test", "--config", str(config)])
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["skipped"] == dict(test_expected)
    answered = [
        json.loads(line)["question_id"]
        for line in (tmp_path / "results" / "predictions_bad.jsonl").open()
    ]
    assert sorted(answered) == sorted(set(keys) - {k for k, v in BAD.items() if v[3]})
    assert "no_assistant_turn" in answered and "cmyk_jpeg" in answered


# Training: the first 2 batches (8 samples) are all bad. Test: the first batch of 8 usable
# prompts comes with the 8 bad ones before it (the no-assistant sample is a fine prompt).
@pytest.mark.parametrize(
    "command, stage, counts",
    [
        ("fit", "training", "8 of 8 training samples (100.0%)"),
        ("test", "test", "8 of 16 test samples (50.0%)"),
    ],
)
def test_too_many_bad_samples_stop_the_run_with_a_report(
    command, stage, counts, tmp_path, tiny_models, capsys
):
    shard, _ = write_bad_shard(tmp_path / "shard-000000.tar")
    config = write_config(
        tmp_path, tiny_models, shard, max_bad_fraction=0.25, bad_fraction_min_samples=8
    )
    with pytest.raises(SystemExit) as info:
        LMMCLI(args=[command, "--config", str(config)])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert f"error: data: {counts} were skipped, more than data.max_bad_fraction=0.25" in err, err[
        -3000:
    ]
    column, seen = (2, list(BAD.values())[:8]) if stage == "training" else (3, BAD.values())
    for reason, n in Counter(v[column] for v in seen if v[column]).items():
        assert f"  {reason}: {n}\n" in err, err[-3000:]
    assert f"e.g. {shard}: sample 'corrupt_image': member 'png': not a readable PNG" in err
    assert "raise data.max_bad_fraction" in err


def test_decoding_guards():
    """Limits outside the planted set: PIL's own bomb limit, formats never opened, odd modes."""
    with pytest.raises(SampleError) as info:
        decode_image(png_claiming(30_000, 30_000))  # above PIL's hard limit: PIL refuses at open
    assert info.value.reason == "image_too_large"
    with pytest.raises(SampleError) as info:
        decode_image(png_claiming(300, 300), max_pixels=300 * 299)
    assert info.value.reason == "image_too_large" and "data.max_image_pixels=89,700" in str(
        info.value
    )
    eps = (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # PIL would run Ghostscript
    )
    with pytest.raises(SampleError) as info:
        decode_image(eps)
    assert info.value.reason == "image_decode"
    for mode in RGB_CONVERTIBLE_MODES:  # the allowed list is exactly what to_rgb converts
        assert to_rgb(Image.new(mode, (4, 4))).mode == "RGB", mode


def test_a_mode_without_rgb_conversion_is_skipped(monkeypatch):
    odd = Image.new("La", (4, 4))  # premultiplied LA: PIL has no conversion to RGB
    monkeypatch.setattr(Image, "open", lambda *a, **kw: odd)
    with pytest.raises(SampleError) as info:
        decode_image(b"any bytes")
    assert info.value.reason == "image_mode" and "'La'" in str(info.value)
