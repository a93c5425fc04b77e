"""The LightningCLI: documented options, overrides, config errors, and a short real fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from lmm.__main__ import main as lmm_main
from lmm.model.connectors import CONNECTORS
from lmm.train.cli import LMMCLI

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_args(tiny_models, tiny_world) -> list[str]:
    """Point the model and data at the fixture directories; no logger, no workers."""
    root, _ = tiny_world
    return [
        "--model.vision.name_or_path", str(tiny_models["vision"]),
        "--model.vision.feature_layer", "-1",
        "--model.llm.name_or_path", str(tiny_models["llm"]),
        "--data.train", f"[{root}/pretrain/shard-*.tar]",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
    ]  # fmt: skip


ALL_COMMANDS = [
    "fit",
    "validate",
    "test",
    "predict",
    "score",
    "tiny",
    "chat",
    "export",
    "checkpoint",
    "import",
]


def test_main_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        lmm_main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("\n\n")[0].splitlines()[1:]]
    assert sorted(listed) == sorted(ALL_COMMANDS)
    # The Lightning part offers fit/validate/test only: predict is lmm's own command.
    assert "{fit,validate,test}" in out and "{fit,validate,test,predict}" not in out


def test_predict_is_lmms_command_not_lightnings(capsys):
    assert "predict" not in LMMCLI.subcommands()
    assert set(LMMCLI.subcommands()) == {"fit", "validate", "test"}
    # The real entry point, as a user types it: lmm's question-file predict.
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lmm", "predict", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "python -m lmm predict" in proc.stdout
        and "--questions" in proc.stdout
        and "--ckpt" in proc.stdout
    )
    # LightningCLI's predict is not reachable through LMMCLI.
    with pytest.raises(SystemExit) as info:
        LMMCLI(args=["predict", "--help"])
    assert info.value.code != 0
    assert "predict" in capsys.readouterr().err


def run_cli_error(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        LMMCLI(args=args, run=False)
    return info.value.code, capsys.readouterr().err


def test_fit_help_documents_freeze_options():
    # The real entry point, as a user types it.
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lmm", "fit", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    flat = " ".join(proc.stdout.split())
    assert "--model.freeze.vision {full,frozen,partial,lora}" in flat
    # The field's doc line from FreezeConfig's docstring, and its type and default.
    assert (
        "``full`` trains the tower, ``frozen`` freezes it, ``partial`` freezes the patch embedding"
        in flat
    )
    assert "default: full" in flat
    assert (
        "--model.freeze.vision_from_layer" in flat
        and "First trainable tower block under ``partial``" in flat
    )
    assert (
        "--model.connector" in flat and "--data.template" in flat and "--trainer.max_steps" in flat
    )
    # data.template's doc names every registered template.
    from lmm.data.templates import TEMPLATES

    doc = flat[flat.rindex("--data.template TEMPLATE") :][
        :800
    ]  # the option's help, not the usage line
    assert all(f"``{name}``" in doc for name in TEMPLATES.names()), doc


def test_overrides_land_in_instantiated_objects(base_args):
    cli = LMMCLI(
        args=base_args
        + ["--model.freeze.vision", "frozen", "--trainer.max_steps", "3", "--data.batch_size", "2"],
        run=False,
    )
    model, dm = cli.model, cli.datamodule
    assert model.freeze_cfg.vision == "frozen"
    assert not any(p.requires_grad for p in model.model.vision.parameters())
    assert all(p.requires_grad for p in model.model.connector.parameters())
    assert all(p.requires_grad for p in model.model.llm.parameters())
    assert cli.trainer.max_steps == 3
    assert dm.batch_size == 2
    # The processor is linked from the model.
    assert dm.processor.tokenizer is model.model.tokenizer
    assert dm.processor.num_image_tokens == model.model.num_image_tokens == 16
    assert dm.processor.image_token_id == model.model.image_token_id
    # Values not overridden keep their documented defaults.
    assert dm.template.name == "plain" and model.hparams["connector"] == "mlp2x_gelu"
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2


def test_unknown_key_names_the_key(base_args, capsys):
    code, err = run_cli_error(base_args + ["--model.freez.vision", "frozen"], capsys)
    assert code != 0
    assert "--model.freez.vision" in err


def test_wrong_type_names_the_key(base_args, capsys):
    code, err = run_cli_error(base_args + ["--data.batch_size", "abc"], capsys)
    assert code != 0
    assert "data.batch_size" in err and "abc" in err


def test_wrong_literal_lists_allowed_values(base_args, capsys):
    code, err = run_cli_error(base_args + ["--model.freeze.vision", "parital"], capsys)
    assert code != 0
    assert "model.freeze.vision" in err and "full" in err and "partial" in err


def test_unknown_connector_lists_known_ones(base_args, capsys):
    code, err = run_cli_error(base_args + ["--model.connector", "mlp9y"], capsys)
    assert code == 2
    assert "model.connector: unknown connector 'mlp9y'" in err
    assert "known: " + ", ".join(CONNECTORS.names()) in err
    assert "Traceback" not in err


def test_unknown_template_lists_known_ones(base_args, capsys):
    code, err = run_cli_error(base_args + ["--data.template", "vicunaa"], capsys)
    assert code == 2
    from lmm.data.templates import TEMPLATES

    assert (
        "data.template: unknown template 'vicunaa'; known: " + ", ".join(TEMPLATES.names()) in err
    )


def test_missing_model_directory_is_a_config_error(base_args, tmp_path, capsys):
    code, err = run_cli_error(
        base_args + ["--model.llm.name_or_path", str(tmp_path / "nope")], capsys
    )
    assert code == 2
    assert "cannot load tokenizer weights" in err and "nope" in err


def test_offline_hub_name_says_how_to_download(base_args, capsys):
    # conftest sets HF_HUB_OFFLINE: a hub name that is not cached cannot be fetched.
    code, err = run_cli_error(
        base_args + ["--model.llm.name_or_path", "lmm-test/no-such-llm"], capsys
    )
    assert code == 2
    assert (
        "`hf download lmm-test/no-such-llm --local-dir DIR`" in err and "huggingface-cli" not in err
    )


# -- a short real fit --------------------------------------------------------------------------


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {log_dir}"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_short_fit_loss_falls_and_weights_round_trip(tiny_models, tiny_world, tmp_path, capsys):
    root, _ = tiny_world
    cfg = yaml.safe_load((REPO / "configs" / "tiny" / "pretrain.yaml").read_text())
    cfg["trainer"].update(max_steps=30, log_every_n_steps=1, default_root_dir=str(tmp_path))
    cfg["trainer"]["logger"]["init_args"] = {"save_dir": str(tmp_path / "runs"), "name": "pretrain"}
    cfg["model"]["vision"]["name_or_path"] = str(tiny_models["vision"])
    cfg["model"]["llm"]["name_or_path"] = str(tiny_models["llm"])
    cfg["model"]["optim"].update(lr_vision=3e-3, lr_connector=3e-3, lr_llm=3e-3)
    weights = tmp_path / "pretrain.safetensors"
    cfg["model"]["save_weights"] = str(weights)
    cfg["data"].update(
        train=[f"{root}/pretrain/shard-*.tar"],
        batch_size=8,
        num_workers=0,
        max_length=64,
        shuffle_buffer=64,
    )
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(cfg))

    cli = LMMCLI(args=["fit", "--config", str(config)])
    assert cli.trainer.global_step == 30
    out = capsys.readouterr().out
    assert "Parameters for this stage" in out and f"to {weights}" in out

    losses = [v for _, v in _scalars(tmp_path / "runs", "train/loss")]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 4.0  # a random 512-token LM starts near ln(512) = 6.2
    assert last < 0.75 * first, (first, last)

    # The weights file holds the trained model; init_from loads it into a new run's model.
    trained = cli.model.model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        assert len(keys) == len(trained)
        saved = {k: f.get_tensor(k) for k in keys}
    for k, v in saved.items():
        assert torch.equal(v, trained[k]), k
    common = [
        "--model.vision.name_or_path",
        str(tiny_models["vision"]),
        "--model.vision.feature_layer",
        "-1",
        "--model.llm.name_or_path",
        str(tiny_models["llm"]),
        "--trainer.logger",
        "false",
        "--model.connector",
        json.dumps(cfg["model"]["connector"]),
        "--data.train",
        f"[{root}/pretrain/shard-*.tar]",
    ]
    loaded = LMMCLI(
        args=common + ["--model.init_from", str(weights)], run=False
    ).model.model.state_dict()
    fresh = LMMCLI(args=common, run=False).model.model.state_dict()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    assert not torch.equal(fresh["connector.layers.0.weight"], saved["connector.layers.0.weight"])
    assert not torch.equal(
        fresh["llm.model.embed_tokens.weight"], saved["llm.model.embed_tokens.weight"]
    )
