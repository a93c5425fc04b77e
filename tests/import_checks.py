"""Checks shared by the import tests: a short LoRA fit from an imported directory and an export
back, and the switch for tests that need the reference prompt rules (issue 17's text side)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lmm.data.encode import IMAGE_PLACEMENTS, TOKENIZATIONS

HAS_REFERENCE_TEXT = "llava" in IMAGE_PLACEMENTS and "chunked" in TOKENIZATIONS
needs_reference_text = pytest.mark.skipif(
    not HAS_REFERENCE_TEXT, reason="needs image_placement=llava (issue 17 text side)"
)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(
        (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    )


def lora_fit(ckpt_dir: Path, shards: str, tmp_path: Path) -> Path:
    """Two LoRA steps (LM adapters, connector trained, tower frozen) from an imported directory,
    configured by ``fit_config``; returns the checkpoint directory the fit writes."""
    from lmm.checkpoints.directory import fit_config
    from lmm.train.cli import LMMCLI

    cfg = fit_config(ckpt_dir)
    if not HAS_REFERENCE_TEXT:  # the training side of those conventions is issue 17's
        cfg["data"].update(image_placement="as_written", tokenization="single_pass")
    out = tmp_path / "lora_ckpt"
    cfg["model"].update(
        freeze={
            "vision": "frozen",
            "connector": "full",
            "llm": "lora",
            "llm_lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]},
        },
        optim={"lr_llm": 0.05, "lr_connector": 0.01},
        save_checkpoint_dir=str(out),
    )
    cfg["data"].update(
        train=[shards], batch_size=2, num_workers=0, max_length=min(cfg["data"]["max_length"], 256)
    )
    cfg["trainer"] = {
        "max_steps": 2,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli = LMMCLI(args=["fit", "--config", str(config)])
    assert cli.trainer.global_step == 2
    return out


def assert_lora_changed_the_lm(before, after) -> None:
    """The merged adapters changed the attention weights they target, and nothing else of the LM."""
    a, b = before.model.llm.state_dict(), after.model.llm.state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(
        changed
    )[:4]


def same_conventions(tuned, imported) -> bool:
    """The fit recorded the imported conventions (those ``lora_fit`` had to override aside)."""
    from dataclasses import replace

    if HAS_REFERENCE_TEXT:
        return tuned.conventions == imported.conventions
    return (
        replace(tuned.conventions, image_placement="llava", tokenization="chunked")
        == imported.conventions
    )
