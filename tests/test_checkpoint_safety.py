"""Safe saving and loading: an interrupted checkpoint write leaves the previous checkpoint
loadable; checkpoints and shards holding pickled objects are refused, never unpickled."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from conftest import json_bytes, png_bytes

from lmm.checkpoints.atomic import partial_path
from lmm.checkpoints.lightning_io import SafeCheckpointIO
from lmm.errors import UnsafeCheckpointError
from lmm.train.cli import LMMCLI

REPO = Path(__file__).resolve().parents[1]


def state(step: int) -> dict:
    return {
        "global_step": step,
        "state_dict": {"w": torch.full((64, 64), float(step))},
        "note": f"step {step}",
    }


def test_a_save_interrupted_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io_ = SafeCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io_.save_checkpoint(state(1), path)

    def crash(fd):  # half of the new file is on disk when the "power fails"
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        raise OSError("simulated crash during the checkpoint write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated crash"):
        io_.save_checkpoint(state(2), path)
    monkeypatch.undo()
    loaded = io_.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(
        loaded["state_dict"]["w"], state(1)["state_dict"]["w"]
    )
    assert os.listdir(path.parent) == ["last.ckpt"]  # the partial file is cleaned up
    io_.save_checkpoint(state(3), path)
    assert io_.load_checkpoint(path)["global_step"] == 3


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """A real crash: the writing process SIGKILLs itself with half of the new checkpoint written."""
    old, new = io.BytesIO(), io.BytesIO()
    torch.save(state(1), old)
    torch.save(state(2), new)
    (tmp_path / "new.bin").write_bytes(new.getvalue())
    path = tmp_path / "last.ckpt"
    path.write_bytes(old.getvalue())
    script = (
        "import os, signal, sys\n"
        "from lmm.checkpoints.atomic import atomic_write\n"
        "data = open(sys.argv[2], 'rb').read()\n"
        "def write(f):\n"
        "    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "new.bin")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (
        partial_path(path).stat().st_size == len(new.getvalue()) // 2
    )  # the crash left its half-written file
    assert SafeCheckpointIO().load_checkpoint(path)["global_step"] == 1
    SafeCheckpointIO().save_checkpoint(
        state(3), path
    )  # the next save replaces the stale partial file
    assert (
        SafeCheckpointIO().load_checkpoint(path)["global_step"] == 3
        and not partial_path(path).exists()
    )


class Payload:
    """Unpickling this object would create a file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, tiny_models, tiny_world, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({**state(1), "extra": Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refused: it holds pickled Python objects"):
        SafeCheckpointIO().load_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True only"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "any.ckpt", weights_only=False)
    assert not marker.exists()

    # `python -m lmm fit --ckpt_path`: LightningCLI reads the hyperparameters, the Trainer the rest.
    with pytest.raises(SystemExit) as info:
        LMMCLI(args=fit_args(tmp_path, tiny_models, tiny_world, evil))
    assert info.value.code == 1
    assert f"error: {evil}: refused: it holds pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()


def fit_args(tmp_path, tiny_models, tiny_world, ckpt_path: Path) -> list[str]:
    root = tiny_world[0]
    return [
        "fit",
        "--model.vision.name_or_path",
        str(tiny_models["vision"]),
        "--model.vision.feature_layer",
        "-1",
        "--model.llm.name_or_path",
        str(tiny_models["llm"]),
        "--data.train",
        f"[{root}/pretrain/shard-*.tar]",
        "--data.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.max_steps",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--ckpt_path",
        str(ckpt_path),
    ]


def test_an_empty_checkpoint_file_is_corrupt_not_unsafe(tmp_path, tiny_models, tiny_world, capsys):
    """torch raises a bare EOFError for it; LightningCLI reads --ckpt_path before any model."""
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(EOFError):
        torch.load(empty, weights_only=True)
    with pytest.raises(SystemExit) as info:
        LMMCLI(args=fit_args(tmp_path, tiny_models, tiny_world, empty))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {empty}: corrupt checkpoint: the file is empty (0 bytes)" in err, err[-2000:]


def write_shard(path: Path, member: str, marker: Path) -> str:
    """A shard whose second sample carries a pickle member (``member`` extension)."""
    pickled = io.BytesIO()
    torch.save(Payload(marker), pickled)
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(8):
            meta = json_bytes({"id": f"s-{i}", "conversations": conv})
            sample = {"__key__": f"s-{i}", "json": meta, "png": png_bytes()}
            if i == 1:
                sample[member] = pickled.getvalue()
            sink.write(sample)
    return str(path)


@pytest.mark.parametrize("command, member, workers", [("fit", "pyd", 1), ("test", "pickle", 0)])
def test_shard_with_a_pickle_member_is_refused(
    command, member, workers, tmp_path, tiny_models, capsys
):
    marker = tmp_path / "code_ran"
    shard = write_shard(tmp_path / "shard-000000.tar", member, marker)
    cfg = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "max_steps": 2,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "vision": {"name_or_path": str(tiny_models["vision"]), "feature_layer": -1},
            "llm": {"name_or_path": str(tiny_models["llm"])},
            "results_dir": str(tmp_path / "results"),
        },
        "data": {
            "train": [shard],
            "test": [{"name": "t", "shards": shard}],
            "template": "vicuna",
            "batch_size": 4,
            "eval_batch_size": 4,
            "num_workers": workers,
            "max_length": 64,
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as info:
        LMMCLI(args=[command, "--config", str(tmp_path / "cfg.yaml")])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert (
        f"error: {shard}: sample 's-1' has a '{member}' member; pickled members are refused" in err
    ), err[-2000:]
    assert not marker.exists()


def test_configs_are_data_not_code(tmp_path, tiny_models, capsys):
    """A YAML tag that would call Python (here: create a file) is not constructed."""
    marker = tmp_path / "code_ran"
    config = tmp_path / "evil.yaml"
    config.write_text(
        f"model:\n  results_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    args = [
        "--config",
        str(config),
        "--model.vision.name_or_path",
        str(tiny_models["vision"]),
        "--model.llm.name_or_path",
        str(tiny_models["llm"]),
    ]
    with pytest.raises(SystemExit) as info:
        LMMCLI(args=args, run=False)
    assert info.value.code != 0 and "python/object/apply" in capsys.readouterr().err
    assert not marker.exists()
