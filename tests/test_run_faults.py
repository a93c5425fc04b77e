"""Faults that stop a ``python -m lmm fit`` run, created for real: a full disk (a small tmpfs), a
read-only checkpoint directory, a damaged or unsafe ``last.ckpt``, a checkpoint of another freeze
policy, SIGTERM under FSDP2 on 2 CPU processes.

Each run must end with one ``error: ...`` line that names the file and the fault, a non-zero exit
status and no Python traceback, and leave a checkpoint that still loads and resumes to weights
bit-identical (torch.equal) to the uninterrupted run's. The tmpfs and read-only mounts need root
(as the CI runs); without it the tests that need them are skipped, or a chmod stands in for the
read-only mount.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_checkpoint_safety import Payload
from test_fault_tolerance import (
    assert_same_weights,
    checkpoint_step,
    checkpointing,
    fit,
    marker,
    start_fit,
    wait_for_step,
    weights,
    write_config,
)

from lmm.checkpoints.atomic import partial_path
from lmm.checkpoints.integrity import damage
from lmm.checkpoints.lightning_io import SafeCheckpointIO
from lmm.errors import CheckpointWriteError
from lmm.train.fault_tolerance import SIGTERM_EXIT_STATUS
from lmm.train.preflight import estimate_checkpoint_bytes

STEPS = 8
EVERY = 2
TRACEBACK = "Traceback (most recent call last)"
ROOT = os.geteuid() == 0


def config(path: Path, tiny_models, tiny_world, ckpt: Path, *callbacks, **trainer) -> Path:
    return write_config(
        path,
        tiny_models,
        tiny_world[0],
        callbacks=[checkpointing(ckpt, every_n_steps=EVERY), *callbacks],
        **{"max_steps": STEPS, **trainer},
    )


def run(config: Path, log: Path, *args: str, timeout: float = 180) -> tuple[int, str]:
    proc = start_fit(config, log, *args)
    return proc.wait(timeout=timeout), log.read_text()


def assert_stopped_cleanly(code: int, out: str, status: int, *says: str) -> None:
    assert code == status, out[-3000:]
    assert TRACEBACK not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) <= 1, errors
    for text in says:
        assert text in out, (text, out[-3000:])


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tiny_world, tmp_path_factory) -> tuple[Path, dict, int]:
    """An uninterrupted run saving every 2 steps: its checkpoint directory (last.ckpt of step 8,
    previous.ckpt of step 6), its final weights, the pre-flight's estimate of a checkpoint."""
    out = tmp_path_factory.mktemp("uninterrupted")
    cli = fit(config(out / "fit.yaml", tiny_models, tiny_world, out / "ckpt"))
    assert cli.trainer.global_step == STEPS
    estimate = estimate_checkpoint_bytes(cli.model, cli.trainer.optimizers)
    return out / "ckpt", weights(cli), estimate


def resume_gives_uninterrupted_weights(
    tmp_path, tiny_models, tiny_world, ckpt: Path, ckpt_path: str, reference: dict, what: str
) -> None:
    resumed = fit(
        config(tmp_path / "resume.yaml", tiny_models, tiny_world, ckpt), "--ckpt_path", ckpt_path
    )
    assert resumed.trainer.global_step == STEPS
    assert_same_weights(weights(resumed), reference, what)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (needs root); skips the test where it cannot be mounted."""
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a {size} tmpfs at {path} (needs root): {err}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def protectable(tmp_path: Path):
    """(disk, protect(dir), unprotect(dir), what the fit reports): root ignores file permissions,
    so as root the whole disk, a tmpfs, is remounted read-only; otherwise ``dir`` is chmod-ed."""
    if ROOT:
        with tmpfs(tmp_path / "disk", "8m") as disk:
            yield (
                disk,
                lambda _: remount(disk, "ro"),
                lambda _: remount(disk, "rw"),
                "read-only file system",
            )
        return
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        yield disk, lambda d: d.chmod(0o555), lambda d: d.chmod(0o755), "permission denied"
    finally:
        for d in (disk, *disk.iterdir()):
            d.chmod(0o755)


def fault_after_a_save(tmp_path, tiny_models, tiny_world, ckpt: Path, fault) -> tuple[int, str]:
    """Start a fit, call ``fault()`` once the save of step 2 is done, return (status, output)."""
    steps, log = tmp_path / "step", tmp_path / "fit.log"
    cfg = config(tmp_path / "fit.yaml", tiny_models, tiny_world, ckpt, marker(steps, 0.3))
    proc = start_fit(cfg, log)
    wait_for_step(proc, steps, EVERY + 1, log)  # the marker runs before the checkpoint callback
    fault()
    return proc.wait(timeout=120), log.read_text()


# -- a full disk -------------------------------------------------------------------------------


def test_checkpoint_size_estimate_bounds_the_file_torch_wrote(uninterrupted):
    """The pre-flight's estimate (made before any optimizer state exists) against the size of
    the checkpoint torch.save wrote with AdamW's state in it: never below, at most 30% above."""
    ckpt, _, estimate = uninterrupted
    written = (ckpt / "last.ckpt").stat().st_size
    assert written <= estimate <= 1.3 * written, (written, estimate)


def test_a_save_on_a_full_then_read_only_disk_raises_one_error_that_says_so(tmp_path):
    """The issue's reproduction: 400 kB of zeros into a 64 kB tmpfs (torch's zip writer reports
    'unexpected pos'), then the same tmpfs read-only (the temporary file's cleanup fails too)."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        last = disk / "last.ckpt"
        with pytest.raises(CheckpointWriteError) as info:
            SafeCheckpointIO().save_checkpoint({"w": torch.zeros(100_000)}, last)
        message = str(info.value)
        assert message.startswith(
            f"{last}: no space left on the device: the checkpoint needs about 4"
        )
        assert f"free in {disk}" in message and info.value.__suppress_context__  # one traceback
        assert not last.exists() and not partial_path(last).exists()
        remount(disk, "ro")
        with pytest.raises(CheckpointWriteError, match=f"{disk} is on a read-only file system"):
            SafeCheckpointIO().save_checkpoint({"w": torch.zeros(10)}, last)


def test_full_disk_before_training_stops_with_the_numbers(tiny_models, tiny_world, tmp_path):
    """One checkpoint of this model is about 0.9 MB; a save needs room for two."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        ckpt, steps = disk / "ckpt", tmp_path / "step"
        cfg = config(tmp_path / "fit.yaml", tiny_models, tiny_world, ckpt, marker(steps, 0))
        code, out = run(cfg, tmp_path / "fit.log")
        assert_stopped_cleanly(
            code, out, 1, f"error: {ckpt}: not enough space for this run's checkpoints", "free"
        )
        assert not steps.exists(), "training started"
        assert not any(ckpt.iterdir())


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tiny_models, tiny_world, tmp_path, uninterrupted
):
    _, reference, _ = uninterrupted
    with tmpfs(tmp_path / "disk", "4m") as disk:
        ckpt, filler = disk / "ckpt", disk / "filler"

        def fill() -> None:  # another process takes all but 64 kB
            filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 64 * 1024))

        code, out = fault_after_a_save(tmp_path, tiny_models, tiny_world, ckpt, fill)
        last = ckpt / "last.ckpt"
        assert_stopped_cleanly(
            code,
            out,
            1,
            f"error: {last}: no space left on the device: the checkpoint needs about",
            f"free in {ckpt}",
        )
        assert checkpoint_step(last) == EVERY and not partial_path(last).exists()
        filler.unlink()
        resume_gives_uninterrupted_weights(
            tmp_path, tiny_models, tiny_world, ckpt, "last", reference, "after a full disk"
        )


# -- a read-only directory ----------------------------------------------------------------------


def test_read_only_directory_before_training(tiny_models, tiny_world, tmp_path):
    with protectable(tmp_path) as (disk, protect, _, fault):
        protect(disk)
        ckpt, steps = disk / "ckpt", tmp_path / "step"
        cfg = config(tmp_path / "fit.yaml", tiny_models, tiny_world, ckpt, marker(steps, 0))
        code, out = run(cfg, tmp_path / "fit.log")
        assert_stopped_cleanly(
            code, out, 1, f"error: {ckpt}: cannot write checkpoints there", fault
        )
        assert not steps.exists(), "training started"


def test_read_only_directory_during_a_run_keeps_the_previous_checkpoint(
    tiny_models, tiny_world, tmp_path, uninterrupted
):
    """As root the cleanup of the unwritten temporary file fails too (EROFS): one message still."""
    _, reference, _ = uninterrupted
    with protectable(tmp_path) as (disk, protect, unprotect, fault):
        ckpt = disk / "ckpt"
        code, out = fault_after_a_save(
            tmp_path, tiny_models, tiny_world, ckpt, lambda: protect(ckpt)
        )
        last = ckpt / "last.ckpt"
        assert_stopped_cleanly(code, out, 1, f"error: {last}: cannot write the checkpoint", fault)
        unprotect(ckpt)
        assert checkpoint_step(last) == EVERY
        resume_gives_uninterrupted_weights(
            tmp_path, tiny_models, tiny_world, ckpt, "last", reference, "after a read-only disk"
        )


# -- a damaged or unsafe last.ckpt --------------------------------------------------------------


def damaged(kind: str, good: bytes, tmp_path: Path) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "empty":
        return b""
    if kind == "random":
        return os.urandom(len(good))
    # A well-formed checkpoint with a pickled object planted in it.
    buf = io.BytesIO()
    state = torch.load(io.BytesIO(good), weights_only=True)
    torch.save({**state, "planted": Payload(tmp_path / "code_ran")}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "pickled"])
def test_damaged_last_checkpoint_names_the_one_that_loads(
    kind, tiny_models, tiny_world, tmp_path, uninterrupted
):
    source, reference, _ = uninterrupted
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    last, previous = ckpt / "last.ckpt", ckpt / "previous.ckpt"
    last.write_bytes(damaged(kind, last.read_bytes(), tmp_path))
    fault = (
        "refused: it holds pickled Python objects" if kind == "pickled" else "corrupt checkpoint"
    )
    cfg = config(tmp_path / "fit.yaml", tiny_models, tiny_world, ckpt)
    code, out = run(cfg, tmp_path / "fit.log", "--ckpt_path", "last")
    assert_stopped_cleanly(
        code,
        out,
        1,
        f"error: {last}: {fault}",
        f"{previous} (step {STEPS - EVERY}) loads: resume from it with --ckpt_path {previous}",
    )
    assert not (tmp_path / "code_ran").exists()
    resume_gives_uninterrupted_weights(
        tmp_path, tiny_models, tiny_world, ckpt, str(previous), reference, f"{kind} last.ckpt"
    )


class Note:
    """An ordinary object: only full unpickling restores it."""


def test_damage_tells_broken_bytes_from_a_well_formed_file(tmp_path):
    """What torch's weights-only loader raises is no guide (an UnpicklingError both for random
    bytes and for a pickled object); the structure check is, and agrees with torch.load."""

    buf = io.BytesIO()
    torch.save({"w": torch.arange(300.0), "note": Note()}, buf)
    good = buf.getvalue()
    flipped = bytearray(good)
    flipped[good.index(b"Note") + 1] ^= 0x01  # in data.pkl: its checksum no longer matches
    cases = {
        "empty": b"",
        "truncated": good[:-1],
        "half": good[: len(good) // 2],
        "random": os.urandom(len(good)),
        "flipped byte": bytes(flipped),
        "plain pickle": b"\x80\x04\x95" + os.urandom(40),
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(data)
        with pytest.raises(Exception):  # torch cannot restore it either
            torch.load(path, weights_only=False)
        assert damage(path) is not None, name
    well_formed = tmp_path / "note.ckpt"
    well_formed.write_bytes(good)
    torch.load(well_formed, weights_only=False)  # the full unpickler restores it
    with pytest.raises(Exception):
        torch.load(well_formed, weights_only=True)
    assert damage(well_formed) is None


def test_missing_last_checkpoint_with_a_previous_one_does_not_start_from_scratch(
    tiny_models, tiny_world, tmp_path, uninterrupted, capsys
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(uninterrupted[0], ckpt)
    (ckpt / "last.ckpt").unlink()
    with pytest.raises(SystemExit) as info:
        fit(config(tmp_path / "fit.yaml", tiny_models, tiny_world, ckpt), "--ckpt_path", "last")
    assert info.value.code == 1
    assert (
        f"error: {ckpt / 'last.ckpt'}: missing, and {ckpt / 'previous.ckpt'} (step 6) loads"
        in capsys.readouterr().err
    )


def test_checkpoint_of_another_freeze_policy_says_so(
    tiny_models, tiny_world, tmp_path, uninterrupted, capsys
):
    ckpt = tmp_path / "ckpt"  # (an explicit checkpoint file would bring its own hyperparameters)
    shutil.copytree(uninterrupted[0], ckpt)
    cfg = config(tmp_path / "fit.yaml", tiny_models, tiny_world, ckpt)
    with pytest.raises(SystemExit) as info:
        fit(cfg, "--model.freeze.llm", "full", "--ckpt_path", "last")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {ckpt / 'last.ckpt'}: its weights do not fit this model" in err, err[-2000:]
    assert "freeze policy it was trained with" in err


# -- SIGTERM under FSDP2 on 2 processes ---------------------------------------------------------

FSDP2 = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
}
FSDP2_STEPS = 4


def fsdp2_config(path: Path, tiny_models, tiny_world, ckpt: Path, weights_file: Path, *callbacks):
    cfg = write_config(
        path,
        tiny_models,
        tiny_world[0],
        callbacks=[checkpointing(ckpt, every_n_steps=0), *callbacks],
        devices=2,
        strategy=FSDP2,
        max_steps=FSDP2_STEPS,
    )
    data = yaml.safe_load(cfg.read_text())
    data["model"]["save_weights"] = str(weights_file)  # gathered from the shards at the end
    # (Writing LoRA's merged weights from FSDP2 shards is not supported: every layer trains.)
    data["model"]["freeze"] = {"llm": "full"}
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def child_pids(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_fsdp2_sigterm_launcher_exits_after_every_rank_saved(tiny_models, tiny_world, tmp_path):
    ckpt, steps, log = tmp_path / "ckpt", tmp_path / "step", tmp_path / "fit.log"
    reference_file, resumed_file = (
        tmp_path / "reference.safetensors",
        tmp_path / "resumed.safetensors",
    )
    reference = start_fit(
        fsdp2_config(
            tmp_path / "ref.yaml", tiny_models, tiny_world, tmp_path / "ref", reference_file
        ),
        tmp_path / "ref.log",
    )
    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    cfg = fsdp2_config(
        tmp_path / "fit.yaml", tiny_models, tiny_world, ckpt, resumed_file, marker(steps, 0.5)
    )
    proc = start_fit(cfg, log)
    wait_for_step(proc, steps, 1, log)
    (rank1,) = child_pids(proc.pid)  # the launcher (rank 0) started rank 1
    wait_for_step(proc, steps, 2, log)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    code = proc.wait(timeout=120)
    assert not Path(f"/proc/{rank1}").exists(), "rank 1 outlived the launcher"
    out = log.read_text()
    assert_stopped_cleanly(code, out, SIGTERM_EXIT_STATUS, "stopped by SIGTERM")
    assert out.count("stopped by SIGTERM") == 2  # both ranks
    last = ckpt / "last.ckpt"  # a distributed checkpoint: one shard file per rank
    assert {p.name for p in last.iterdir()} >= {
        "__0_0.distcp",
        "__1_0.distcp",
        ".metadata",
        "meta.pt",
    }
    saved = torch.load(last / "meta.pt", weights_only=True)["global_step"]
    assert 2 <= saved < FSDP2_STEPS and f"SIGTERM: saved step {saved} to {last}" in out
    assert not resumed_file.exists()

    code, out = run(cfg, tmp_path / "resume.log", "--ckpt_path", "last", timeout=300)
    assert code == 0, out[-3000:]
    assert_same_weights(
        load_file(str(resumed_file)), load_file(str(reference_file)), "FSDP2 resume"
    )
