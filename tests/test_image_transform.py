"""Image preprocessing: every PIL mode to RGB, and resize / pad / crop / letterbox into the square input.

Expected values are computed by hand from the documented rules (see ``lmm.data.image``).
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.data.image import ImageTransform, decode_image, fit_square, to_rgb
from lmm.errors import ConfigError
from lmm.visual.image_spec import ImageSpec

RED = (200, 30, 30)
BLUE = (20, 40, 220)
# A mean whose 8-bit colour is exact (0.2 * 255 = 51, ...), so padding is exactly 0 after normalisation.
SPEC_MEAN = (0.2, 0.4, 0.6)
FILL = (51, 102, 153)


def _spec(size: int, preprocess: str, mean=SPEC_MEAN) -> ImageSpec:
    return ImageSpec(size=size, mean=mean, std=(0.25, 0.25, 0.25), preprocess=preprocess)


def _px(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def _half_half(w: int, h: int) -> Image.Image:
    """Left half RED, right half BLUE."""
    img = Image.new("RGB", (w, h), RED)
    img.paste(Image.new("RGB", (w - w // 2, h), BLUE), (w // 2, 0))
    return img


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


# -- every PIL mode -> RGB -----------------------------------------------------------------------


def test_rgb_is_unchanged_and_l_and_1_replicate():
    rgb = Image.fromarray(np.array([[[1, 2, 3], [250, 128, 0]]], dtype=np.uint8), "RGB")
    assert np.array_equal(_px(to_rgb(rgb)), np.asarray(rgb))
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L")
    assert _px(to_rgb(grey)).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    assert _px(to_rgb(bw)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    for x, index in enumerate([0, 1, 2]):
        pal.putpixel((x, 0), index)
    assert _px(to_rgb(pal)).tolist() == [[[10, 20, 30], [200, 100, 50], [0, 255, 0]]]
    pal.info["transparency"] = 1  # palette entry 1 is fully transparent (a GIF/PNG tRNS)
    assert _px(to_rgb(pal, background=(7, 8, 9))).tolist() == [
        [[10, 20, 30], [7, 8, 9], [0, 255, 0]]
    ]


def test_rgba_is_alpha_composited_over_the_background():
    arr = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    bg = (10, 250, 128)
    out = _px(to_rgb(Image.fromarray(arr, "RGBA"), background=bg))
    a = 128 / 255
    half = [
        _round(200 * a + 10 * (1 - a)),
        _round(100 * a + 250 * (1 - a)),
        _round(0 * a + 128 * (1 - a)),
    ]
    assert half == [105, 175, 64]  # 100.39 + 4.98, 50.20 + 124.51, 0 + 63.75
    assert out.tolist() == [[[200, 100, 0], [10, 250, 128], half]]
    # Default background: white.
    assert _px(to_rgb(Image.fromarray(arr[:, 1:2], "RGBA"))).tolist() == [[[255, 255, 255]]]


def test_la_and_premultiplied_rgba():
    la = Image.fromarray(np.array([[[100, 51], [100, 255]]], dtype=np.uint8), "LA")
    # 100 * 51/255 + 255 * 204/255 = 20 + 204
    assert _px(to_rgb(la)).tolist() == [[[224, 224, 224], [100, 100, 100]]]
    premult = Image.fromarray(np.array([[[100, 50, 0, 255]]], dtype=np.uint8), "RGBA").convert(
        "RGBa"
    )
    assert _px(to_rgb(premult, background=(0, 0, 0))).tolist() == [[[100, 50, 0]]]


def test_cmyk():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (100, 50, 0, 40))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    # R = (255 - C) * (255 - K) / 255: 155 * 215 / 255 = 130.7, 205 * 215 / 255 = 172.8, 255 * 215 / 255 = 215
    assert _px(to_rgb(cmyk)).tolist() == [[[131, 173, 215], [0, 0, 0]]]


def test_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32768, 60000, 65535]], dtype=np.uint16)
    # v * 255 / 65535 = v / 257: 1000 -> 3.89, 32768 -> 127.50, 60000 -> 233.46 (clipping would give 255)
    expected = [0, 1, 4, 128, 233, 255]
    little = Image.fromarray(values)  # I;16
    assert little.mode == "I;16"
    big = Image.frombytes("I;16B", (6, 1), values.astype(">u2").tobytes())
    for img in (little, big):
        assert _px(to_rgb(img))[0, :, 0].tolist() == expected, img.mode
        assert (_px(to_rgb(img)) == _px(to_rgb(img))[..., :1]).all()  # grey stays grey
    # A 16-bit PNG round trip decodes to the same values (the real data path).
    buf = io.BytesIO()
    little.save(buf, format="PNG")
    assert _px(to_rgb(decode_image(buf.getvalue())))[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 100, 255], [0, 100, 255]),  # fits 8 bits: kept
        ([0, 1000, 65535], [0, 4, 255]),  # 16-bit data: / 257
        ([-100, 0, 100], [0, 128, 255]),  # outside [0, 65535]: min-max stretched (127.5 half up)
        ([0, 100000, 200000], [0, 128, 255]),
    ],
)
def test_32_bit_integer(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.int32), "I")
    assert img.mode == "I"
    assert _px(to_rgb(img))[0, :, 1].tolist() == expected


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # [0, 1] scaled by 255
        ([0.0, 100.0, 200.0], [0, 100, 200]),  # fits 8 bits: kept
        ([0.0, 1000.0, 65535.0], [0, 4, 255]),  # 16-bit range
        ([-1.0, 0.0, 1.0], [0, 128, 255]),  # negative: min-max
    ],
)
def test_float(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.float32), "F")
    assert img.mode == "F"
    assert _px(to_rgb(img))[0, :, 2].tolist() == expected


def test_transform_composites_transparency_on_the_mean_colour():
    spec = _spec(4, "pad")
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert spec.fill == FILL
    assert (_px(ImageTransform(spec).prepare(clear)) == FILL).all()
    torch.testing.assert_close(ImageTransform(spec)(clear), torch.zeros(3, 4, 4), rtol=0, atol=1e-6)


# -- resize / pad / letterbox -------------------------------------------------------------------


def _rows_equal(px: np.ndarray, rows, colour) -> bool:
    return bool((px[list(rows)] == colour).all())


def test_resize_squashes_without_padding():
    out = _px(fit_square(_half_half(8, 4), 16, "resize", FILL))
    assert out.shape == (16, 16, 3)
    assert not (out == FILL).all(axis=-1).any()  # no padding anywhere
    assert (out == out[:1]).all()  # every row the same: the 4 rows were stretched to 16
    # The split stays at half the width (bicubic rings for a few columns around it).
    assert (
        (out[:, :5] == RED).all()
        and (out[:, 11:] == BLUE).all()
        and not (out[:, 5:11] == RED).all()
    )


def test_pad_centres_the_image_on_a_mean_colour_square():
    out = _px(fit_square(Image.new("RGB", (8, 4), RED), 8, "pad", FILL))  # padded to 8x8, no resize
    assert out.shape == (8, 8, 3)
    assert _rows_equal(out, [0, 1, 6, 7], FILL) and _rows_equal(out, range(2, 6), RED)
    # Odd padding: the extra row goes to the bottom.
    out = _px(fit_square(Image.new("RGB", (7, 4), RED), 7, "pad", FILL))
    assert _rows_equal(out, [0, 5, 6], FILL) and _rows_equal(out, range(1, 5), RED)
    # Tall images are padded left and right.
    out = _px(fit_square(Image.new("RGB", (4, 8), RED), 8, "pad", FILL))
    assert (out[:, [0, 1, 6, 7]] == FILL).all() and (out[:, 2:6] == RED).all()


def test_pad_then_resize():
    # 64x32 -> padded to 64x64 (content rows 16..47) -> resized to 16: content rows 4..11.
    out = _px(fit_square(Image.new("RGB", (64, 32), RED), 16, "pad", FILL))
    assert out.shape == (16, 16, 3)
    assert _rows_equal(out, [0, 1, 14, 15], FILL)
    assert _rows_equal(out, range(6, 10), RED)
    # Padding is resampled together with the image: the rows at the border are blends.
    assert not _rows_equal(out, [3], FILL) and not _rows_equal(out, [4], RED)


def test_letterbox_keeps_aspect_and_pads_after_scaling():
    # 8x4 -> scaled to 16x8 (aspect 2:1 kept) -> rows 4..11 content, exactly; padding exact.
    out = _px(fit_square(_half_half(8, 4), 16, "letterbox", FILL))
    assert out.shape == (16, 16, 3)
    assert _rows_equal(out, [0, 1, 2, 3, 12, 13, 14, 15], FILL)
    content = ~(out == FILL).all(axis=-1)
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 11, 0, 15)
    assert (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1) == 8 / 4
    assert (out[4:12, :5] == RED).all() and (out[4:12, 11:] == BLUE).all()
    # Tall and odd: 5 wide x 3 high into 8 -> 8 x round(4.8) = 5 rows, 1 row on top, 2 below.
    out = _px(fit_square(Image.new("RGB", (5, 3), RED), 8, "letterbox", FILL))
    assert _rows_equal(out, [0, 6, 7], FILL) and _rows_equal(out, range(1, 6), RED)
    out = _px(fit_square(Image.new("RGB", (3, 5), RED), 10, "letterbox", FILL))  # 6 x 10
    assert (out[:, [0, 1, 8, 9]] == FILL).all() and (out[:, 2:8] == RED).all()
    # Downscaling works the same: 40x10 into 8 -> 8x2, rows 3..4.
    out = _px(fit_square(Image.new("RGB", (40, 10), RED), 8, "letterbox", FILL))
    assert _rows_equal(out, [0, 1, 2, 5, 6, 7], FILL) and _rows_equal(out, [3, 4], RED)


@pytest.mark.parametrize("mode", ["resize", "pad", "letterbox", "crop"])
def test_square_images_are_only_resized(mode):
    img = _half_half(8, 8)
    ref = img.resize((16, 16), Image.Resampling.BICUBIC)
    assert np.array_equal(_px(fit_square(img, 16, mode, FILL)), np.asarray(ref))
    assert fit_square(img, 8, mode, FILL).tobytes() == img.tobytes()


@pytest.mark.parametrize("mode", ["pad", "letterbox"])
def test_padding_is_zero_after_normalisation(mode):
    spec = _spec(16, mode)
    x = ImageTransform(spec)(Image.new("RGB", (16, 8), RED))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, :4], torch.zeros(3, 4, 16), rtol=0, atol=1e-6)
    red = (torch.tensor(RED) / 255 - torch.tensor(SPEC_MEAN)) / 0.25
    torch.testing.assert_close(x[:, 7], red.view(3, 1).expand(3, 16), rtol=0, atol=1e-6)
    assert torch.equal(ImageTransform(spec).blank(), torch.zeros(3, 16, 16))


def test_fill_is_the_mean_colour_truncated_or_rounded():
    clip_mean = (0.48145466, 0.4578275, 0.40821073)  # 122.77, 116.75, 104.09
    # floor (default): LLaVA's `tuple(int(x * 255) for x in image_mean)` (llava/train/train.py).
    assert _spec(8, "pad", mean=clip_mean).fill == (122, 116, 104)
    assert _spec(8, "pad", mean=(0.5, 0.5, 0.5)).fill == (127, 127, 127)
    nearest = ImageSpec(size=8, mean=clip_mean, std=(0.5,) * 3, fill_rounding="nearest")
    assert nearest.fill == (123, 117, 104)
    assert replace(nearest, mean=(0.5,) * 3).fill == (128, 128, 128)
    with pytest.raises(ConfigError, match="model.vision.fill_rounding.*floor, nearest"):
        replace(nearest, fill_rounding="round")


def test_unknown_preprocess_names_the_option_and_the_choices():
    choices = "square, pad, crop, resize, letterbox"
    with pytest.raises(ConfigError) as info:
        ImageSpec(size=8, mean=(0.5,) * 3, std=(0.5,) * 3, preprocess="centre")
    assert "model.vision.image_preprocess" in str(info.value) and choices in str(info.value)
    with pytest.raises(ConfigError, match="pad, crop, resize, letterbox"):
        fit_square(Image.new("RGB", (4, 2)), 4, "squash", FILL)
    with pytest.raises(ConfigError, match="letterbox"):
        _spec(8, "pad").with_preprocess("Letterbox")
    assert _spec(8, "pad").with_preprocess("letterbox").preprocess == "letterbox"


def test_square_is_the_towers_own_mode_and_refused_when_unknown():
    assert _spec(8, "square").mode == "resize"  # native default: a squash
    crop = ImageSpec(size=8, mean=SPEC_MEAN, std=(0.25,) * 3, preprocess="square", native="crop")
    assert crop.mode == "crop" and crop.with_preprocess("pad").mode == "pad"
    with pytest.raises(
        ConfigError, match="image_preprocess=square.*choose resize, crop, pad or letterbox"
    ):
        replace(crop, native=None)
    assert replace(crop, native=None, preprocess="crop").mode == "crop"
    with pytest.raises(ConfigError, match="crop_from=6 is smaller than the input size 8"):
        replace(crop, crop_from=6)


def test_crop_resizes_the_shortest_edge_then_keeps_the_centre():
    # 8 wide x 4 high, shortest edge -> 8: 16 x 8, then the centre 8 columns (4..11).
    img = Image.fromarray(np.arange(8 * 4 * 3, dtype=np.uint8).reshape(4, 8, 3))
    out = fit_square(img, 8, "crop", FILL)
    ref = img.resize((16, 8), Image.Resampling.BICUBIC).crop((4, 0, 12, 8))
    assert out.size == (8, 8) and out.tobytes() == ref.tobytes()
    # crop_from: shortest edge to 10 (tall 3 x 7 -> 10 x int(10 * 7 / 3) = 23), centre 8: offsets 1, 7.
    tall = Image.fromarray(np.arange(3 * 7 * 3, dtype=np.uint8).reshape(7, 3, 3))
    ref = tall.resize((10, 23), Image.Resampling.BICUBIC).crop((1, 7, 9, 15))
    assert fit_square(tall, 8, "crop", FILL, crop_from=10).tobytes() == ref.tobytes()
    # pad with a crop-style tower only resizes its square (crop_from plays no part).
    padded = fit_square(tall, 8, "pad", FILL)
    square = Image.new("RGB", (7, 7), FILL)
    square.paste(tall, (2, 0))
    assert padded.tobytes() == square.resize((8, 8), Image.Resampling.BICUBIC).tobytes()


def test_spec_from_json_lists_is_hashable_tuples():
    spec = ImageSpec(size=8, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert spec.mean == (0.5, 0.5, 0.5) and spec.preprocess == "pad"
    hash(spec)
