"""Fault-tolerant fit (``lmm.train.fault_tolerance``): a training process killed at a random step (SIGKILL, or
SIGTERM as a preempting scheduler sends it) and resumed with ``--ckpt_path last`` ends with
bit-identical weights to an uninterrupted run; checkpoints come by steps and by time, only at
optimizer-step boundaries.

The killed runs are real ``python -m lmm fit`` subprocesses; the uninterrupted reference and the
resumed runs run in this process (the same code path, without paying the import time again).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lmm.train.cli import LMMCLI
from lmm.train.fault_tolerance import SIGTERM_EXIT_STATUS

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = (
    20  # 64 pretrain samples / batch 4 = 16 steps per epoch: the runs cross an epoch boundary
)
EVERY = 3  # checkpoint interval (steps) of the killed runs


def write_config(
    path: Path, tiny_models, world: Path, *, callbacks=(), num_workers: int = 0, **trainer
) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": MAX_STEPS, "logger": False,
            "enable_checkpointing": any("FaultTolerant" in c["class_path"] for c in callbacks),
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "default_root_dir": str(path.parent), "callbacks": list(callbacks), **trainer,
        },
        "model": {
            "vision": {"name_or_path": str(tiny_models["vision"]), "feature_layer": -1},
            "llm": {"name_or_path": str(tiny_models["llm"])},
            "freeze": {"llm": "lora"},  # LoRA dropout: resume must also restore the random state
            "optim": {"lr_vision": 1e-3, "lr_connector": 1e-3, "lr_llm": 1e-3, "warmup_ratio": 0.1},
        },
        "data": {"train": [f"{world}/pretrain/shard-*.tar"], "batch_size": 4, "num_workers": num_workers,
                 "max_length": 64},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def checkpointing(dirpath: Path, **kw) -> dict:
    return {
        "class_path": "lmm.train.fault_tolerance.FaultTolerantCheckpoint",
        "init_args": {"dirpath": str(dirpath), "every_n_steps": EVERY, "every_n_minutes": 0, **kw},
    }


def marker(path: Path, delay_s: float) -> dict:
    return {
        "class_path": "step_marker.StepMarker",
        "init_args": {"path": str(path), "delay_s": delay_s},
    }


def fit(config: Path, *args: str) -> LMMCLI:
    return LMMCLI(args=["fit", "--config", str(config), *args])


def weights(cli: LMMCLI) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def reference(tiny_models, tiny_world, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run without any checkpointing."""
    config = write_config(
        tmp_path_factory.mktemp("reference") / "fit.yaml", tiny_models, tiny_world[0]
    )
    cli = fit(config)
    assert cli.trainer.global_step == MAX_STEPS
    return weights(cli)


def start_fit(config: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "lmm", "fit", "--config", str(config), *args],
            cwd=config.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_step(
    proc: subprocess.Popen, marker_file: Path, step: int, log: Path, timeout: float = 180
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"training exited ({proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}"
            )
        if marker_file.exists() and int(marker_file.read_text() or 0) >= step:
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"training did not reach step {step} in {timeout}s:\n{log.read_text()[-3000:]}")


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_at_a_random_step_and_resumed_gives_the_uninterrupted_weights(
    sig, tiny_models, tiny_world, tmp_path, reference
):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    kill_at = rng.randint(EVERY + 1, MAX_STEPS - 3)
    what = f"{sig} at step {kill_at} (seed {seed})"
    ckpt, steps, log = tmp_path / "ckpt", tmp_path / "step", tmp_path / "fit.log"
    weights_file = tmp_path / "final.safetensors"
    # SIGTERM goes to the whole process group, data worker included, as a scheduler sends it.
    workers = 1 if sig == "SIGTERM" else 0
    config = write_config(
        tmp_path / "fit.yaml",
        tiny_models,
        tiny_world[0],
        num_workers=workers,
        callbacks=[checkpointing(ckpt), marker(steps, delay_s=0.05)],
    )
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["save_weights"] = str(weights_file)
    config.write_text(yaml.safe_dump(cfg))

    proc = start_fit(config, log)
    wait_for_step(proc, steps, kill_at, log)
    time.sleep(rng.uniform(0, 0.05))  # anywhere in the next step, or in its checkpoint write
    os.killpg(proc.pid, getattr(signal, sig))
    code = proc.wait(timeout=120)
    out = log.read_text()
    saved = checkpoint_step(ckpt / "last.ckpt")  # loads: a kill never leaves it half-written
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL, what
        assert 0 < saved <= kill_at + 1 and saved % EVERY == 0, (what, saved)
    else:
        # The step in progress is finished and saved; the run stops without its final weights.
        assert code == SIGTERM_EXIT_STATUS, (what, out[-3000:])
        assert (
            kill_at <= saved < MAX_STEPS
            and f"SIGTERM: saved step {saved} to {ckpt / 'last.ckpt'}" in out
        ), what
        assert "stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
    assert not weights_file.exists(), what

    resumed = fit(
        write_config(
            tmp_path / "resume.yaml", tiny_models, tiny_world[0], callbacks=[checkpointing(ckpt)]
        ),
        "--ckpt_path",
        "last",
    )
    assert resumed.trainer.ckpt_path == str(ckpt / "last.ckpt")
    assert resumed.trainer.global_step == MAX_STEPS
    assert_same_weights(weights(resumed), reference, what)
    assert (
        checkpoint_step(ckpt / "last.ckpt") == MAX_STEPS
    )  # the final state, for a longer run to continue


def test_checkpoints_by_steps_and_by_time_land_on_step_boundaries(
    tiny_models, tiny_world, tmp_path
):
    world = tiny_world[0]
    by_steps = tmp_path / "by_steps"
    fit(
        write_config(
            tmp_path / "steps.yaml",
            tiny_models,
            world,
            max_steps=7,
            callbacks=[checkpointing(by_steps, every_n_steps=3, keep_all=True)],
        )
    )
    assert sorted(p.name for p in by_steps.iterdir()) == [
        "last.ckpt",
        "previous.ckpt",  # the last.ckpt of step 6 (keep_previous)
        "step=3.ckpt",
        "step=6.ckpt",
        "step=7.ckpt",
    ]

    # By time (here: at every chance), with 2 micro-batches per step: never between them.
    by_time = tmp_path / "by_time"
    fit(
        write_config(
            tmp_path / "time.yaml",
            tiny_models,
            world,
            max_steps=3,
            accumulate_grad_batches=2,
            callbacks=[
                checkpointing(by_time, every_n_steps=0, every_n_minutes=1e-9, keep_all=True)
            ],
        )
    )
    names = sorted(p.name for p in by_time.iterdir())
    assert names == ["last.ckpt", "previous.ckpt", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    assert checkpoint_step(by_time / "previous.ckpt") == 2
    for step in (1, 2, 3):
        saved = torch.load(by_time / f"step={step}.ckpt", weights_only=True)
        assert saved["global_step"] == step and saved["LMMDataModule"]["batches"] == 2 * step

    # Neither: only the final state.
    final = tmp_path / "final"
    fit(
        write_config(
            tmp_path / "final.yaml",
            tiny_models,
            world,
            max_steps=2,
            callbacks=[checkpointing(final, every_n_steps=0, every_n_minutes=0)],
        )
    )
    assert [p.name for p in final.iterdir()] == ["last.ckpt"] and checkpoint_step(
        final / "last.ckpt"
    ) == 2


def test_fault_tolerant_config_snippet_parses(tiny_models, tiny_world, tmp_path):
    """configs/trainer/fault_tolerant.yaml stacks on a stage config; its directory can be set per run."""
    config = write_config(tmp_path / "fit.yaml", tiny_models, tiny_world[0])
    cli = LMMCLI(
        args=[
            "--config",
            str(config),
            "--config",
            str(REPO / "configs/trainer/fault_tolerant.yaml"),
            "--trainer.callbacks.dirpath",
            str(tmp_path / "run1"),
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "FaultTolerantCheckpoint"]
    assert cb.dirpath == str(tmp_path / "run1") and cb.every_n_steps > 0 and cb.every_n_minutes > 0
    assert cli.trainer.checkpoint_callback is cb
