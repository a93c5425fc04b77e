"""Multi-image and video samples: the synthetic tasks, shards with several images/frames per
sample, frame sampling, per-frame pooling, and a short fit + test through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lmm.data.collate import collate
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.tarindex import TarSamples
from lmm.data.templates import get_template
from lmm.errors import SampleError
from lmm.model.language import LanguageConfig
from lmm.model.lmm import LMM
from lmm.model.towers import VisionConfig
from lmm.visual.anyres import AnyResConfig
from lmm.visual.layout import Visual, VisualLayout, arrange
from lmm.visual.video import VideoConfig, frame_indices, video_tokens
from lmm.worlds.shapes.multi import (
    DIRECTIONS,
    MultiWorldConfig,
    moving_square_clip,
    write_multi_world,
)
from lmm.worlds.shapes.scene import image_rng

REPO = Path(__file__).resolve().parents[1]
SMALL = MultiWorldConfig(train_samples=12, val_samples=2, test_samples=6, samples_per_shard=10)


@pytest.fixture(scope="module")
def multi_world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("multi_world")
    return out, write_multi_world(out, SMALL)


@pytest.fixture(scope="module")
def ov_lmm(tiny_models):
    """The tiny model with AnyRes and video (3 frames at most; 4x4 tokens pooled to 2x2)."""
    torch.manual_seed(0)
    vision = VisionConfig(
        name_or_path=str(tiny_models["vision"]),
        feature_layer=-1,
        anyres=AnyResConfig(max_grid=2),
        video=VideoConfig(max_frames=3, pool=2),
    )
    return LMM(vision, LanguageConfig(name_or_path=str(tiny_models["llm"])), "mlp2x_gelu").eval()


def _encoder(model, **kw) -> SampleEncoder:
    proc = Processor(
        model.tokenizer,
        model.vision.image_spec,
        model.num_image_tokens,
        model.image_token_id,
        model.image_layout,
    )
    return SampleEncoder(proc, get_template("vicuna"), max_length=512, **kw)


def _samples(root: Path, split: str) -> list[dict]:
    return [
        TarSamples(str(p)).read(i)
        for p in sorted((root / split).glob("shard-*.tar"))
        for i in range(len(TarSamples(str(p))))
    ]


# -- the synthetic tasks ---------------------------------------------------------------------------


def test_world_is_deterministic_and_laid_out(multi_world, tmp_path):
    root, manifest = multi_world
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == \
        {"train": 24, "val": 4, "test/multi_image": 6, "test/video": 6}  # fmt: skip
    again = write_multi_world(tmp_path, SMALL)
    for split in again["splits"].values():
        for shard in split["shards"]:
            assert (tmp_path / shard).read_bytes() == (root / shard).read_bytes(), shard
    train = _samples(root, "train")
    assert sorted(k for k in train[0] if not k.startswith("__")) == ["000.png", "001.png", "json"]
    assert sorted(k for k in train[1] if not k.startswith("__")) == [
        "000.png",
        "001.png",
        "002.png",
        "003.png",
        "json",
    ]
    multi, video = json.loads(train[0]["json"]), json.loads(train[1]["json"])
    assert multi["conversations"][0]["value"] == "Which image has more circles?\n<image>\n<image>"
    assert multi["conversations"][1]["value"] == (
        "first" if multi["circles"][0] > multi["circles"][1] else "second"
    )
    assert video["modality"] == "video" and video["conversations"][0]["value"].count("<image>") == 1
    test = [json.loads(s["json"]) for s in _samples(root, "test/video")]
    assert [r["question_id"] for r in test] == list(range(6)) and {r["category"] for r in test} == {
        "video"
    }
    assert all(len(r["conversations"]) == 1 and r["answer"] in DIRECTIONS for r in test)


@pytest.mark.parametrize("index", range(12))
def test_clip_answer_is_the_squares_motion(index):
    """The pixels that change between the first and last frame move the way the answer says."""
    cfg = MultiWorldConfig()
    frames, direction = moving_square_clip(cfg, image_rng(cfg.world, "check", index))
    first, last = (np.asarray(f, dtype=np.int64) for f in (frames[0], frames[-1]))
    background = np.asarray(cfg.world.background)
    changed = (first != last).any(-1)
    old = changed & (first != background).any(-1)  # where the square was
    new = changed & (last != background).any(-1)  # where it went
    ys, xs = np.nonzero(new)
    yo, xo = np.nonzero(old)
    dx, dy = xs.mean() - xo.mean(), ys.mean() - yo.mean()
    assert np.sign(np.round([dx, dy])).tolist() == list(DIRECTIONS[direction]), (dx, dy, direction)


# -- frames and pooling -------------------------------------------------------------------------------


def test_frame_sampling_is_uniform_up_to_the_cap():
    assert frame_indices(3, 4) == [0, 1, 2]
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(8, 3) == [0, 3, 7]  # linspace(0, 7, 3) = 0, 3.5, 7, rounded down


def test_video_token_count_and_pooling():
    # SigLIP-384 frames: 27x27 pooled to ceil(27/2) = 14 per side; 8 frames + one newline.
    assert video_tokens(8, unit=27, pool=2) == 8 * 196 + 1
    assert (
        VisualLayout(384, 27, video=VideoConfig()).count(Visual("video", 640, 480, frames=8))
        == 1569
    )
    layout = VisualLayout(tile=32, unit=4, video=VideoConfig(pool=2))
    v = Visual("video", 32, 32, frames=3)
    feats = torch.randn(3, 16, 5, generator=torch.Generator().manual_seed(0))
    newline = torch.randn(5)
    out = arrange(feats, [v], layout, newline)
    assert out.shape == (layout.count(v), 5) == (3 * 4 + 1, 5)
    grids = feats.reshape(3, 4, 4, 5).permute(0, 3, 1, 2)
    pooled = F.interpolate(grids, size=(2, 2), mode="bilinear").permute(0, 2, 3, 1).reshape(12, 5)
    torch.testing.assert_close(out[:12], pooled)  # frames in order, each row-major
    torch.testing.assert_close(out[12], newline)  # one newline after the clip


# -- shards -> encoder -> model ------------------------------------------------------------------------


def test_shards_round_trip_to_model(multi_world, ov_lmm):
    root, _ = multi_world
    model = ov_lmm
    enc = _encoder(model)
    raw_multi, raw_video = _samples(root, "train")[:2]
    multi, video = enc.train_sample(raw_multi), enc.train_sample(raw_video)
    assert multi["pixel_values"].items == ((Visual("multi", 48, 48), Visual("multi", 48, 48)),)
    assert multi["pixel_values"].pixels.shape == (2, 3, 32, 32)  # one base view each
    # 4 frames in the shard, 3 kept (0, 1, 3), one <image> for the clip.
    assert video["pixel_values"].items == ((Visual("video", 48, 48, frames=3),),)
    assert video["pixel_values"].pixels.shape[0] == 3
    frames = [enc.transform(img) for img in enc.unpack(raw_video)[1]]
    torch.testing.assert_close(
        video["pixel_values"].pixels, torch.stack([frames[0], frames[1], frames[3]])
    )
    n_ids = lambda s: int((s["input_ids"] == model.image_token_id).sum())  # noqa: E731
    assert n_ids(multi) == 2 * (16 + 1) and n_ids(video) == 3 * 4 + 1
    prompts = [
        enc.prompt_sample(s)
        for s in _samples(root, "test/video")[:2] + _samples(root, "test/multi_image")[:2]
    ]
    batch = collate([multi, video], pad_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.isfinite(
            model(
                batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"]
            )
        )
        answers = model.generate_text(
            **{
                k: v
                for k, v in collate(prompts, model.tokenizer.pad_token_id, left=True).items()
                if k in ("input_ids", "attention_mask", "pixel_values")
            },
            max_new_tokens=2,
        )
    assert len(answers) == 4


def test_video_without_video_settings_is_skipped(multi_world, lmm_model, tiny_models):
    root, _ = multi_world
    raw_video = _samples(root, "train")[1]
    for model in (
        lmm_model,
        LMM(
            VisionConfig(
                name_or_path=str(tiny_models["vision"]), feature_layer=-1, anyres=AnyResConfig()
            ),
            LanguageConfig(name_or_path=str(tiny_models["llm"])),
        ),
    ):
        with pytest.raises(SampleError, match="model.vision.video") as info:
            _encoder(model).train_sample(raw_video)
        assert info.value.reason == "malformed"


def test_truncation_drops_a_whole_clip(ov_lmm):
    from PIL import Image

    meta = {
        "id": "clip",
        "modality": "video",
        "conversations": [
            {"from": "human", "value": "Hi?"},
            {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "<image>\nWhich way?"},
            {"from": "gpt", "value": "left"},
        ],
    }
    frames = [Image.new("RGB", (48, 48), (10 * i, 0, 0)) for i in range(4)]
    full = _encoder(ov_lmm).encode_train(meta, frames)
    start = int((full["input_ids"] == ov_lmm.image_token_id).nonzero()[0])
    assert int((full["input_ids"] == ov_lmm.image_token_id).sum()) == 13  # 3 frames x 2x2 + newline
    cut = SampleEncoder(
        _encoder(ov_lmm).processor, get_template("vicuna"), max_length=start + 5
    ).encode_train(meta, frames)
    assert (
        cut["input_ids"].tolist() == full["input_ids"][:start].tolist()
    )  # the cut moved to the clip's start
    assert cut["pixel_values"].items == ((),) and cut["pixel_values"].pixels.shape[0] == 0


# -- a short fit and test through the CLI --------------------------------------------------------------


def test_short_fit_and_test_on_multi_image_and_video(
    multi_world, tiny_world, tiny_models, tmp_path
):
    from lmm.train.cli import LMMCLI

    root, _ = multi_world
    world, _ = tiny_world
    cfg = yaml.safe_load((REPO / "configs" / "tiny_ov" / "finetune.yaml").read_text())
    cfg["trainer"].update(
        max_steps=3, val_check_interval=3, logger=False, default_root_dir=str(tmp_path)
    )
    cfg["model"]["vision"]["name_or_path"] = str(tiny_models["vision"])
    cfg["model"]["llm"]["name_or_path"] = str(tiny_models["llm"])
    weights = tmp_path / "ov.safetensors"
    cfg["model"].update(
        init_from=None, save_weights=str(weights), results_dir=str(tmp_path / "results")
    )
    d = cfg["data"]
    d.update(
        train=[
            {"shards": f"{root}/train/shard-*.tar", "weight": 1.0},
            {"shards": f"{world}/finetune/shard-*.tar", "weight": 0.25},
        ],
        batch_size=4,
        eval_batch_size=8,
        num_workers=0,
    )
    d["val"]["shards"] = f"{root}/val/shard-*.tar"
    d["test"] = [
        {"name": t, "shards": f"{root}/test/{t}/shard-*.tar", "kind": "short_answer"}
        for t in ("multi_image", "video")
    ]
    config = tmp_path / "ov.yaml"
    config.write_text(yaml.safe_dump(cfg))

    fit = LMMCLI(args=["fit", "--config", str(config)])
    assert fit.trainer.global_step == 3 and weights.is_file()
    assert fit.model.model.connector.image_newline.requires_grad
    test = LMMCLI(args=["test", "--config", str(config), "--model.init_from", str(weights)])
    metrics = test.model.test_metrics
    assert metrics["multi_image"]["n"] == 6 and metrics["video"]["n"] == 6
    assert set(metrics["video"]["per_category"]) == {"video"}


def test_validation_figure_shows_each_samples_first_view(multi_world, ov_lmm):
    from lmm.train.viz import denormalise, examples_figure

    root, _ = multi_world
    enc = _encoder(ov_lmm)
    prompts = [
        enc.prompt_sample(_samples(root, "test/video")[0]),
        enc.prompt_sample(_samples(root, "test/multi_image")[0]),
    ]
    batch = collate(prompts, pad_id=ov_lmm.tokenizer.pad_token_id, left=True)
    records = [
        {
            "question": p["meta"]["conversations"][0]["value"],
            "answer": p["meta"]["answer"],
            "text": "?",
        }
        for p in prompts
    ]
    fig = examples_figure(
        batch, records, ov_lmm.vision.image_spec, ov_lmm.num_image_tokens, ov_lmm.image_token_id
    )
    shown = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    pv = batch["pixel_values"]
    assert pv.row_tiles == (3, 2)  # 3 frames; 2 base views
    for img, first in zip(shown, (0, 3)):
        np.testing.assert_allclose(
            np.asarray(img), denormalise(pv.pixels[first], ov_lmm.vision.image_spec).numpy()
        )


def test_packed_multi_image_and_video_samples_keep_their_losses(multi_world, ov_lmm):
    """Packing rows of multi-image and video samples (an ImageBatch) gives each sample the
    loss it has in a padded batch."""
    from lmm.data.packing import pack

    root, _ = multi_world
    enc = _encoder(ov_lmm)
    samples = [enc.train_sample(raw) for raw in _samples(root, "train")[:6]]
    pad = ov_lmm.tokenizer.pad_token_id
    padded = collate(samples, pad_id=pad)
    packed = pack(samples, pad_id=pad, budget=sum(len(s["input_ids"]) for s in samples))
    assert packed["input_ids"].shape[0] < len(samples)
    torch.testing.assert_close(
        ov_lmm.sample_losses(packed), ov_lmm.sample_losses(padded), atol=1e-5, rtol=0
    )
