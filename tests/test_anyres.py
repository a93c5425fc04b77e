"""AnyRes: grid choice, resize-and-pad, unpadding, the budget rule and token counts (by hand,
against transformers' LLaVA-OneVision processor, and data side == model side)."""

from __future__ import annotations

import functools
import random
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lmm.checkpoints.weights import load_weights, save_weights
from lmm.data.collate import collate
from lmm.data.encode import SampleEncoder
from lmm.data.templates import get_template
from lmm.data.visuals import anyres_crops
from lmm.errors import ConfigError, ImageTokenMismatchError
from lmm.model.freeze import FreezeConfig
from lmm.model.language import LanguageConfig
from lmm.model.lmm import LMM
from lmm.model.towers import VisionConfig
from lmm.visual.anyres import (
    AnyResConfig,
    anyres_map,
    fit_in_canvas,
    select_grid,
    shrink_size,
    unpad_bounds,
)
from lmm.visual.image_batch import ImageBatch
from lmm.visual.layout import Visual, VisualLayout, arrange

OV = AnyResConfig()  # LLaVA-OneVision: grids up to 6x6, anyres_max_9
# SigLIP-so400m/14 at 384 px: 27x27 patch tokens per view (mlp2x_gelu keeps them).
SIGLIP = VisualLayout(tile=384, unit=27, anyres=OV)


def ov_count(width: int, height: int, layout: VisualLayout = SIGLIP) -> int:
    return layout.count(Visual("single", width, height))


# -- hand-computed counts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, grid, map_size, tokens",
    [
        # Fits one crop exactly: base 729 + a 27x27 map + 27 newlines.
        ((384, 384), (1, 1), (27, 27), 729 + 27 * 27 + 27),
        # 768 px square: 2x2 crops, a 54x54 map (2916 < 9 x 729 budget), 54 newlines.
        ((768, 768), (2, 2), (54, 54), 729 + 54 * 54 + 54),
        # 6x6 crops: a 162x162 map = 26244 > 6561 tokens; factor sqrt(26244 / 6561) = 2 -> 81x81.
        ((2304, 2304), (6, 6), (81, 81), 729 + 81 * 81 + 81),
        # 1000x300: 1x3 crops (1152x384 canvas keeps all 300k pixels with the least waste); the
        # image becomes 1152x346 in it. Map 27x81; floor(300 * 81 / 1000) = 24 image rows, so
        # (27 - 24) // 2 = 1 padding row goes from each side: 25 rows of 81, each + newline.
        ((1000, 300), (1, 3), (25, 81), 729 + 25 * 81 + 25),
        # The same image standing: 3x1 crops, 81 rows of 25 columns.
        ((300, 1000), (3, 1), (81, 25), 729 + 81 * 25 + 81),
    ],
)
def test_hand_computed_counts(size, grid, map_size, tokens):
    m = anyres_map(*size, unit=27, tile=384, cfg=OV)
    assert m.grid == grid and m.size == map_size
    assert ov_count(*size) == tokens
    assert SIGLIP.tiles(Visual("single", *size)) == 1 + grid[0] * grid[1]


def test_budget_rule_and_its_tolerance():
    # 1920x768 takes 2x5 crops exactly: a 54x135 map = 7290 tokens, factor sqrt(7290 / 6561) = 1.054.
    assert anyres_map(1920, 768, 27, 384, OV).grid == (2, 5)
    assert ov_count(1920, 768) == 729 + 54 * 135 + 54  # within OneVision's 1.1 tolerance: kept
    strict = replace(SIGLIP, anyres=AnyResConfig(shrink_tolerance=1.0))
    # 54 / 1.054 = 51.2, 135 / 1.054 = 128.1 -> 51x128 = 6528 <= 6561
    assert ov_count(1920, 768, strict) == 729 + 51 * 128 + 51
    unlimited = replace(SIGLIP, anyres=AnyResConfig(max_tiles=None))  # LLaVA-NeXT: no budget
    assert ov_count(2304, 2304, unlimited) == 729 + 162 * 162 + 162
    assert shrink_size(162, 162, 27, OV) == (81, 81)


def test_multi_image_and_plain_counts():
    assert SIGLIP.count(Visual("multi", 1000, 300)) == 729 + 1  # base view + newline (OneVision)
    assert SIGLIP.tiles(Visual("multi", 1000, 300)) == 1
    plain = VisualLayout(tile=384, unit=27)  # no AnyRes (e.g. video only): one view, no newline
    assert plain.count(Visual("single", 1000, 300)) == plain.count(Visual("multi", 5, 5)) == 729


# -- geometry -----------------------------------------------------------------------------------


def test_grid_selection():
    assert select_grid(1000, 1000, OV.candidates(), 384) == (3, 3)  # 1152 px keeps every pixel
    # More kept resolution beats less waste: 2x3 keeps all 480k pixels, 2x2 only 768x576.
    assert select_grid(800, 600, [(1, 1), (2, 2), (2, 3)], 384) == (2, 3)
    # Equal resolution and waste: the first candidate wins.
    assert select_grid(500, 500, [(1, 2), (2, 1)], 384) == (1, 2)
    assert select_grid(500, 500, [(2, 1), (1, 2)], 384) == (2, 1)
    next_grids = AnyResConfig(
        grids=[[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]]
    )  # LLaVA-NeXT 1.6 (336 px crops)
    assert next_grids.grids[0] == (1, 2)
    assert select_grid(672, 336, next_grids.candidates(), 336) == (1, 2)


def test_fit_in_canvas_and_unpad():
    assert fit_in_canvas(1000, 300, 1152, 384) == (1152, 346, 0, 19)  # ceil(300 * 1.152) = 346
    assert fit_in_canvas(300, 1000, 384, 1152) == (346, 1152, 19, 0)
    assert fit_in_canvas(384, 384, 384, 384) == (384, 384, 0, 0)
    assert unpad_bounds(1000, 300, 27, 81) == (1, 26, 0, 81)
    assert unpad_bounds(300, 1000, 81, 27) == (0, 81, 1, 26)
    assert unpad_bounds(768, 768, 54, 54) == (0, 54, 0, 54)


def test_crops_are_the_padded_canvas_row_major():
    red, fill = (200, 30, 30), (127, 127, 127)
    crops = anyres_crops(Image.new("RGB", (64, 16), red), (1, 2), 32, fill)
    assert len(crops) == 2 and all(c.size == (32, 32) for c in crops)
    for crop in crops:  # 64x16 pasted at top (32 - 16) // 2 = 8
        assert crop.getpixel((5, 7)) == fill and crop.getpixel((5, 8)) == red
        assert crop.getpixel((5, 23)) == red and crop.getpixel((5, 24)) == fill


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_grid=0),
        dict(grids=[[0, 1]]),
        dict(max_tiles=0),
        dict(shrink_tolerance=0.5),
        dict(crop_fill="grey"),
        dict(multi_image_preprocess="squash"),
    ],
)
def test_bad_settings_name_the_option(bad):
    with pytest.raises(ConfigError, match="model.vision.anyres"):
        AnyResConfig(**bad)


def test_counts_equal_transformers_llava_onevision_processor():
    """transformers' own count for OneVision (anyres_max_9, 384 px, 27x27) on random sizes."""
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor as P,
    )

    pinpoints = [[r * 384, c * 384] for r, c in OV.candidates()]  # (height, width), same order
    ns = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pinpoints),
        num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9",
    )
    ns._get_unpadded_features = functools.partial(P._get_unpadded_features, ns)
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        assert ov_count(w, h) == P._get_number_of_features(ns, h, w, 384, 384), (w, h)


# -- arranging features --------------------------------------------------------------------------


def _coded_tiles(n_tiles: int, unit: int) -> torch.Tensor:
    """[tiles, unit^2, 1] features whose value names (tile, row, col): t*100 + r*10 + c."""
    t, r, c = torch.meshgrid(
        torch.arange(n_tiles), torch.arange(unit), torch.arange(unit), indexing="ij"
    )
    return (t * 100 + r * 10 + c).reshape(n_tiles, unit * unit, 1).float()


def test_arrange_stitches_crops_row_major_with_newlines():
    layout = VisualLayout(tile=32, unit=2, anyres=AnyResConfig(max_grid=2, max_tiles=None))
    v = Visual("single", 64, 32)  # 1x2 crops, nothing to unpad
    out = arrange(_coded_tiles(3, 2), [v], layout, torch.tensor([-1.0]))[:, 0].tolist()
    assert out == [0, 1, 10, 11,  100, 101, 200, 201, -1,  110, 111, 210, 211, -1]  # fmt: skip
    assert len(out) == layout.count(v)


def test_arrange_removes_padding_rows():
    layout = VisualLayout(tile=32, unit=4, anyres=AnyResConfig(max_grid=2, max_tiles=None))
    v = Visual(
        "single", 64, 16
    )  # 1x2 crops; map 4x8, floor(16 * 8 / 64) = 2 image rows -> rows 1, 2
    out = arrange(_coded_tiles(3, 4), [v], layout, torch.tensor([-1.0]))[16:, 0].reshape(2, 9)
    assert out[:, :4].tolist() == [[110, 111, 112, 113], [120, 121, 122, 123]]
    assert out[:, 4:8].tolist() == [[210, 211, 212, 213], [220, 221, 222, 223]]
    assert out[:, 8].tolist() == [-1, -1]


def test_arrange_shrinks_by_bilinear_interpolation():
    layout = VisualLayout(tile=32, unit=4, anyres=AnyResConfig(max_grid=2, max_tiles=1))
    v = Visual("single", 64, 32)  # 4x8 map = 32 tokens > 16: factor sqrt(2) -> 2x5
    tiles = torch.randn(3, 16, 6, generator=torch.Generator().manual_seed(0))
    newline = torch.randn(6)
    out = arrange(tiles, [v], layout, newline)
    stitched = tiles[1:].reshape(1, 2, 4, 4, 6).permute(0, 2, 1, 3, 4).reshape(4, 8, 6)
    expect = F.interpolate(stitched.permute(2, 0, 1)[None], size=(2, 5), mode="bilinear")[
        0
    ].permute(1, 2, 0)
    grid = out[16:].reshape(2, 6, 6)
    torch.testing.assert_close(grid[:, :5], expect)
    torch.testing.assert_close(grid[:, 5], newline.expand(2, 6))
    torch.testing.assert_close(out[:16], tiles[0])


# -- data side == model side ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anyres_lmm(tiny_models):
    """The tiny model with AnyRes (32 px crops, 4x4 tokens each, up to 3x3 crops, budget 2 crops)."""
    torch.manual_seed(0)
    vision = VisionConfig(
        name_or_path=str(tiny_models["vision"]),
        feature_layer=-1,
        anyres=AnyResConfig(max_grid=3, max_tiles=2),
    )
    return LMM(vision, LanguageConfig(name_or_path=str(tiny_models["llm"])), "mlp2x_gelu").eval()


def _processor(model):
    from lmm.data.encode import Processor

    return Processor(
        model.tokenizer,
        model.vision.image_spec,
        model.num_image_tokens,
        model.image_token_id,
        model.image_layout,
    )


def _sample(sid: str, w: int, h: int, seed: int) -> tuple[dict, list]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    meta = {
        "id": sid,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "a circle"},
        ],
    }
    return meta, [Image.fromarray(pixels)]


def test_data_count_equals_model_features_for_random_sizes(anyres_lmm):
    """Property: for random image sizes the ids the data side expands ``<image>`` to and the
    features the model builds are the same number, and the batch merges without error."""
    model, layout = anyres_lmm, anyres_lmm.image_layout
    enc = SampleEncoder(_processor(model), get_template("vicuna"), max_length=4096)
    rng = random.Random(1)
    samples, grids = [], set()
    for i in range(24):
        w, h = rng.randint(4, 120), rng.randint(4, 120)
        out = enc.encode_train(*_sample(f"s{i}", w, h, i))
        pv = out["pixel_values"]
        v = Visual("single", w, h)
        assert pv.items == ((v,),)
        assert pv.pixels.shape[0] == layout.tiles(v)
        n_ids = int((out["input_ids"] == model.image_token_id).sum())
        with torch.no_grad():
            n_features = model.encode_images(pv).shape[0]
        assert n_ids == n_features == layout.count(v), (w, h)
        samples.append(out)
        grids.add(anyres_map(w, h, layout.unit, layout.tile, layout.anyres).grid)
    assert len(grids) >= 5  # the sizes really exercise different grids
    batch = collate(samples[:6], pad_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        loss = model(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"]
        )
    assert embeds.shape[:2] == batch["input_ids"].shape and torch.isfinite(loss)


def test_sample_with_another_count_fails_clearly(anyres_lmm):
    model = anyres_lmm
    proc = _processor(model)
    other = replace(
        proc, layout=replace(proc.layout, anyres=AnyResConfig(max_grid=1))
    )  # 1x1 grids only
    enc_ok = SampleEncoder(proc, get_template("vicuna"), max_length=4096)
    enc_other = SampleEncoder(other, get_template("vicuna"), max_length=4096)
    batch = collate(
        [
            enc_ok.encode_train(*_sample("fine", 40, 40, 0)),
            enc_other.encode_train(*_sample("wide", 100, 30, 1)),
        ],
        pad_id=model.tokenizer.pad_token_id,
    )
    with pytest.raises(
        ImageTokenMismatchError,
        match=r"row 1 has \d+ positions .* take \[\d+\] tokens.*another model",
    ):
        model.embed(batch["input_ids"], batch["pixel_values"])
    with pytest.raises(ImageTokenMismatchError, match="ImageBatch"):
        model.embed(
            batch["input_ids"], batch["pixel_values"].pixels
        )  # a plain tensor cannot say the sizes


def test_image_batch_to_a_fixed_count_model_fails(lmm_model, anyres_lmm):
    enc = SampleEncoder(_processor(anyres_lmm), get_template("vicuna"), max_length=4096)
    batch = collate(
        [enc.encode_train(*_sample("a", 40, 40, 0))], pad_id=anyres_lmm.tokenizer.pad_token_id
    )
    with pytest.raises(ImageTokenMismatchError, match="no model.vision.anyres/video"):
        lmm_model.embed(batch["input_ids"], batch["pixel_values"])


def test_image_batch_moves_like_a_tensor():
    pv = ImageBatch.of_sample(torch.zeros(2, 3, 4, 4), [Visual("single", 9, 9)])
    moved = pv.to(torch.float64)
    assert (
        moved.pixels.dtype == torch.float64 and moved.items == pv.items and moved.row_tiles == (2,)
    )


# -- the newline parameter ------------------------------------------------------------------------


def test_newline_is_a_connector_parameter(anyres_lmm, lmm_model, tmp_path):
    import copy

    model = copy.deepcopy(anyres_lmm)
    width = model.llm.get_input_embeddings().weight.shape[1]
    assert model.connector.image_newline.shape == (width,)
    assert "connector.image_newline" in model.state_dict()
    assert (
        "connector.image_newline" not in lmm_model.state_dict()
    )  # fixed-count models are unchanged
    model.apply_freeze(FreezeConfig(vision="frozen", connector="full", llm="frozen"))
    assert model.connector.image_newline.requires_grad
    model.apply_freeze(FreezeConfig(vision="full", connector="frozen", llm="full"))
    assert not model.connector.image_newline.requires_grad
    with torch.no_grad():
        model.connector.image_newline.fill_(0.5)
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    fresh = copy.deepcopy(anyres_lmm)
    assert "connector.image_newline" in load_weights(fresh, path)
    assert torch.equal(fresh.connector.image_newline, torch.full((width,), 0.5))
    # Older weights without the newline load into an AnyRes model (it keeps its initialisation).
    old = tmp_path / "old.safetensors"
    save_weights(lmm_model, old)
    assert "connector.image_newline" not in load_weights(copy.deepcopy(anyres_lmm), old)


def test_resampler_has_no_grid_to_stitch(tiny_models):
    vision = VisionConfig(
        name_or_path=str(tiny_models["vision"]), feature_layer=-1, anyres=AnyResConfig()
    )
    with pytest.raises(ConfigError, match="square patch grid"):
        LMM(
            vision,
            LanguageConfig(name_or_path=str(tiny_models["llm"])),
            {"name": "resampler", "num_queries": 4, "heads": 2},
        )


def test_siglip_384_tower_end_to_end(tmp_path, tiny_models):
    """A SigLIP-so400m-shaped tower (384 px, patch 14: 27x27) on a 384² and a 1000x300 image:
    the encoder expands exactly the hand-computed counts and the model fills them."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tower = tmp_path / "siglip384"
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=384,
            patch_size=14,
        )
    ).save_pretrained(tower)
    SiglipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(tower)
    vision = VisionConfig(name_or_path=str(tower), feature_layer=-1, anyres=AnyResConfig())
    model = LMM(vision, LanguageConfig(name_or_path=str(tiny_models["llm"])), "mlp2x_gelu").eval()
    assert model.num_image_tokens == 729 and model.image_layout.unit == 27
    enc = SampleEncoder(_processor(model), get_template("vicuna"), max_length=8192)
    for (w, h), tokens in (((384, 384), 729 + 27 * 28), ((1000, 300), 729 + 25 * 82)):
        meta, images = _sample("q", w, h, 0)
        out = enc.encode_prompt(meta, images)  # the prompt: everything before the answer
        assert int((out["input_ids"] == model.image_token_id).sum()) == tokens
        batch = collate([out], pad_id=model.tokenizer.pad_token_id, left=True)
        with torch.no_grad():
            assert model.embed(batch["input_ids"], batch["pixel_values"]).shape[1] == len(
                out["input_ids"]
            )


def test_checkpoint_dir_keeps_the_layout_and_export_refuses_it(anyres_lmm, tiny_models, tmp_path):
    from lmm.checkpoints.directory import load_checkpoint_dir, save_checkpoint_dir
    from lmm.checkpoints.hf_export import export_llava
    from lmm.errors import ExportError

    vision = VisionConfig(
        name_or_path=str(tiny_models["vision"]),
        feature_layer=-1,
        anyres=AnyResConfig(max_grid=3, max_tiles=2),
    )
    out = save_checkpoint_dir(
        anyres_lmm,
        tmp_path / "ckpt",
        vision=vision,
        llm=LanguageConfig(name_or_path=str(tiny_models["llm"])),
        connector="mlp2x_gelu",
        template=get_template("vicuna"),
        max_length=512,
    )
    ckpt = load_checkpoint_dir(out)
    assert ckpt.model.image_layout == anyres_lmm.image_layout
    assert torch.equal(ckpt.model.connector.image_newline, anyres_lmm.connector.image_newline)
    with pytest.raises(ExportError, match="model.vision.anyres"):
        export_llava(ckpt, tmp_path / "hf")
