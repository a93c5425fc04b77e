"""Data-parallel and sharded training on 2 CPU processes (gloo) reach the same losses and
weights as one process over the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPEC
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "parallel_fit.py"


def _run(tiny_models, strategy: str, out: Path) -> tuple[list[float], dict, bool]:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--vision",
        str(tiny_models["vision"]),
        "--llm",
        str(tiny_models["llm"]),
        "--image-size",
        str(TINY_SPEC.image_size),
        "--strategy",
        strategy,
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "losses.json").read_text())
    return result["losses"], load_file(str(out / "weights.safetensors")), result["sharded"]


@pytest.fixture(scope="module")
def single(tiny_models, tmp_path_factory):
    return _run(tiny_models, "single", tmp_path_factory.mktemp("par") / "single")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(tiny_models, single, strategy, tmp_path):
    losses, weights, sharded = _run(tiny_models, strategy, tmp_path / strategy)
    ref_losses, ref_weights, _ = single
    assert sharded == (strategy == "fsdp2")  # parameters were DTensor shards during training
    assert len(losses) == len(ref_losses) == 3
    assert ref_losses[-1] < ref_losses[0]  # the same batch each step: it trained
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    assert weights.keys() == ref_weights.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, ref_weights[name], atol=2e-5, rtol=1e-4, msg=name)
