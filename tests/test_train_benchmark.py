"""The training benchmark's parts: the comparison is apples to apples (same weights give
transformers' LLaVA loss), and its padding and FLOP accounting is right on hand-made cases."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "train_throughput.py"
_spec = importlib.util.spec_from_file_location("train_throughput", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["train_throughput"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)

SMALL = replace(
    bench.SHAPES["tiny"],
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    llm_width=32,
    llm_layers=1,
    llm_heads=2,
    llm_intermediate=64,
    batch_size=4,
)


def test_same_weights_give_transformers_llava_loss(tmp_path):
    paths = bench.build_models(tmp_path, SMALL)
    assert bench.parity(paths, SMALL) < 1e-5


def test_padding_waste_on_hand_made_batches():
    shape = replace(
        SMALL, batch_size=2, max_length=20, image_size=16, patch_size=16
    )  # 1 image token
    specs = [{"text": t, "image": False, "answer": 1} for t in (10, 2, 5, 5)]
    waste = bench.padding_waste(specs, shape)
    # plain: [10, 2] -> 20 computed, [5, 5] -> 10: 8 of 30 are padding.
    assert waste["plain"] == pytest.approx(8 / 30)
    # grouped (one window): [2, 5] and [5, 10] -> 10 + 20 computed, 8 padding: the same here.
    assert waste["grouped"] == pytest.approx(8 / 30)
    # packed into rows of <= 20: [10, 2] -> one row of 12; [5, 5] -> one row of 10: no padding.
    assert waste["packed"] == pytest.approx(0.0)


def test_distribution_is_seeded_and_fits_the_context():
    a = bench.sample_lengths(500, SMALL, seed=3)
    assert a == bench.sample_lengths(500, SMALL, seed=3)
    assert all(
        bench.length(s, SMALL) <= SMALL.max_length and 1 <= s["answer"] < s["text"] for s in a
    )
    text_only = sum(not s["image"] for s in a) / len(a)
    assert 0.05 < text_only < 0.15


def test_model_flops_count_the_lm_head_only_at_supervised_tokens():
    shape = replace(SMALL, image_size=16, patch_size=16)
    one = {"text": 10, "image": False, "answer": 2}
    more = {"text": 10, "image": False, "answer": 5}
    assert (
        bench.model_flops([more], shape) - bench.model_flops([one], shape)
        == 6 * shape.llm_width * shape.vocab_size * 3
    )
