"""``python -m lmm fit|validate|test``: a LightningCLI over LMMModule and LMMDataModule.

``python -m lmm predict`` is lmm's own command (``lmm.inference.predictor``, routed in ``lmm.__main__``), so
LightningCLI's ``predict`` subcommand (which needs a ``predict_step``) is not offered here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmm.checkpoints.integrity import load_error, saved_step
from lmm.checkpoints.lightning_io import use_safe_checkpoint_io
from lmm.data.datamodule import LMMDataModule
from lmm.errors import (
    BadDataError,
    CheckpointMismatchError,
    CheckpointWriteError,
    ConfigError,
    CorruptCheckpointError,
    MissingWeightsError,
    NonFiniteError,
    UnsafeCheckpointError,
    UnsafeShardError,
)
from lmm.train.fault_tolerance import SIGTERM_EXIT_STATUS, FaultTolerantCheckpoint
from lmm.train.module import LMMModule
from lmm.train.nonfinite import NonFiniteGuard
from lmm.train.preflight import CheckpointPreflight
from lmm.train.progress import ProgressLog
from lmm.train.ranks import (
    ERROR_TIMEOUT_S,
    STOP_TIMEOUT_S,
    hold_child_ranks,
    wait_for_child_ranks,
)

VARIANT_PLACEHOLDER = "{variant}"
# Faults that end a run on purpose, with a message that says what happened and what to do.
RUN_STOPPERS = (
    NonFiniteError,
    BadDataError,
    UnsafeShardError,
    UnsafeCheckpointError,
    CorruptCheckpointError,
    CheckpointWriteError,
)
LIGHTNING_DESCRIPTION = (
    "lmm's Lightning Trainer commands: fit, validate and test from YAML recipes (--config) with every "
    "model/data/trainer field as a typed option. lmm's other commands (predict, score, tiny, chat, export, "
    "import, checkpoint) are listed by `python -m lmm --help`."
)


def accumulation_steps(
    global_batch_size: int, devices: int, num_nodes: int, batch_size: int
) -> int:
    """Micro-batches per optimizer step so that ``devices x num_nodes x batch_size x steps``
    samples make one step; a ConfigError when the global batch does not split evenly."""
    per_pass = devices * num_nodes * batch_size
    if global_batch_size < 1 or global_batch_size % per_pass:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not a positive multiple of devices ({devices}) x "
            f"num_nodes ({num_nodes}) x data.batch_size ({batch_size}) = {per_pass}; change data.batch_size "
            "or the device count"
        )
    return global_batch_size // per_pass


def substitute_variant(node: Any, variant: Optional[str], key: str = "") -> Any:
    """Replace ``{variant}`` in every string of a parsed config (in place for namespaces,
    dicts and lists); an unset ``variant`` with a placeholder left is a ConfigError."""
    if isinstance(node, str):
        if VARIANT_PLACEHOLDER not in node:
            return node
        if variant is None:
            raise ConfigError(
                f"{key}={node!r} uses {VARIANT_PLACEHOLDER} but no variant is set: add a model file "
                "(e.g. --config configs/tinyllava/models/SigLIP-Phi-2.yaml) or --variant NAME"
            )
        return node.replace(VARIANT_PLACEHOLDER, variant)
    if isinstance(node, list):
        node[:] = [substitute_variant(v, variant, f"{key}[{i}]") for i, v in enumerate(node)]
    elif isinstance(node, dict):
        for k in node:
            node[k] = substitute_variant(node[k], variant, f"{key}.{k}" if key else k)
    elif isinstance(node, Namespace):
        for k, v in vars(node).items():
            setattr(node, k, substitute_variant(v, variant, f"{key}.{k}" if key else k))
    return node


def _check_last_is_there(callback: FaultTolerantCheckpoint) -> None:
    """``--ckpt_path last`` finds no last.ckpt, but the checkpoint before it is there: stop rather
    than start from scratch (Lightning's choice when it finds none)."""
    last, previous = Path(callback.last_path), Path(callback.previous_path)
    if last.exists() or not previous.is_file():
        return
    step = saved_step(previous)
    if step is None:
        advice = f"{previous} does not load either: move it away to start from scratch"
    else:
        advice = (
            f"{previous} (step {step}) loads: resume from it with --ckpt_path {previous}, or move "
            "it away to start from scratch"
        )
    raise CorruptCheckpointError(f"{last}: missing, and {advice}")


def _own_message(err: Exception) -> str:
    """The error's message; for one re-raised from a DataLoader worker (PyTorch puts the worker's
    traceback in the message), the original message, from the traceback's last line."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    return text.rstrip().splitlines()[-1].split(": ", 1)[-1]


class LMMCLI(LightningCLI):
    """Every model/data/trainer field is a typed, documented option (``--help``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        try:
            super().__init__(
                LMMModule,
                LMMDataModule,
                seed_everything_default=0,
                trainer_defaults={"callbacks": [ProgressLog(), CheckpointPreflight()]},
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": "python -m lmm", "description": LIGHTNING_DESCRIPTION},
                args=args,
                run=run,
            )
        except SIGTERMException:
            # Preempted: lmm.train.fault_tolerance.FaultTolerantCheckpoint (if configured) has saved and said where.
            self._exit(
                "stopped by SIGTERM", SIGTERM_EXIT_STATUS, STOP_TIMEOUT_S, SIGTERM_EXIT_STATUS
            )
        except RUN_STOPPERS as err:
            self._exit(f"error: {_own_message(err)}", 1, ERROR_TIMEOUT_S)
        except CheckpointMismatchError as err:
            self._exit(f"error: {self._ckpt_path()}: {err}", 1, ERROR_TIMEOUT_S)
        # A run that ended well: the other ranks are finishing too.
        self._report_ranks(wait_for_child_ranks(getattr(self, "trainer", None), STOP_TIMEOUT_S, 0))

    def _exit(
        self, message: str, status: int, timeout_s: float, expected: Optional[int] = None
    ) -> NoReturn:
        """Print ``message``, wait for the ranks this process started (lmm.train.ranks), exit."""
        trainer = getattr(self, "trainer", None)
        hold_child_ranks(trainer)  # first: a child's non-zero exit must not get this one killed
        print(message, file=sys.stderr, flush=True)
        self._report_ranks(wait_for_child_ranks(trainer, timeout_s, expected))
        raise SystemExit(status) from None

    @staticmethod
    def _report_ranks(problems: list[str]) -> None:
        for line in problems:
            print(f"warning: {line}", file=sys.stderr, flush=True)

    def _ckpt_path(self) -> Any:
        trainer = getattr(self, "trainer", None)
        config = getattr(self, "config", None) or {}
        given = (config.get(str(config.get("subcommand")), None) or {}).get("ckpt_path")
        return getattr(trainer, "ckpt_path", None) or given

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyperparameters itself (torch.load, weights_only=True)
        # before any model is built; a file that does not load says why as the Trainer would.
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            failure = load_error(self._ckpt_path(), err)
            if failure is None:
                raise
            raise failure from None

    def before_fit(self) -> None:
        if self._ckpt_path() == "last":
            for callback in self.trainer.checkpoint_callbacks:
                if isinstance(callback, FaultTolerantCheckpoint):
                    _check_last_is_there(callback)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands less ``predict``: LMMModule has no ``predict_step``, and
        ``python -m lmm predict`` is lmm's question-file command (``lmm.inference.predictor``)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer, image size and tokens-per-image come from the built model.
        parser.link_arguments("model.processor", "data.processor", apply_on="instantiate")
        # Always on (a callback with its own options: --nonfinite.max_consecutive).
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_argument(
            "--global_batch_size",
            type=Optional[int],
            default=None,
            help="Samples per optimizer step over all devices and nodes (a recipe's batch size). Sets "
            "trainer.accumulate_grad_batches = global_batch_size / (devices x num_nodes x data.batch_size); "
            "an error if that does not divide evenly. None: no accumulation beyond the trainer's setting.",
        )
        parser.add_argument(
            "--variant",
            type=Optional[str],
            default=None,
            help="Name of the vision tower + LLM pair (e.g. SigLIP-Phi-2), set by a recipe's model file; "
            "every '{variant}' in the config's strings (output paths, logger names) becomes it, so one "
            "stage file serves every pair.",
        )

    def _stage_config(self):
        return self.config.get(str(self.subcommand), self.config)

    def before_instantiate_classes(self) -> None:
        cfg = self._stage_config()
        try:
            substitute_variant(cfg, cfg.get("variant"))
        except ConfigError as err:
            self._config_error(err)

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        use_safe_checkpoint_io(trainer)  # atomic saves; --ckpt_path loads never unpickle
        cfg = self._stage_config()
        if cfg.get("global_batch_size") is not None:
            # Set right after the Trainer is built: it resolves devices ("auto", lists, -1)
            # itself, and nothing reads the accumulation before fit starts.
            steps = accumulation_steps(
                cfg.global_batch_size, trainer.num_devices, trainer.num_nodes, cfg.data.batch_size
            )
            configured = cfg.trainer.get("accumulate_grad_batches", 1)
            if configured not in (1, steps):
                raise ConfigError(
                    f"trainer.accumulate_grad_batches={configured} contradicts global_batch_size="
                    f"{cfg.global_batch_size} (which needs {steps}); set only one of them"
                )
            trainer.accumulate_grad_batches = steps
            cfg.trainer.accumulate_grad_batches = steps  # the saved config.yaml records what ran
        return trainer

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ConfigError, MissingWeightsError, FileNotFoundError) as err:
            self._config_error(err)

    @staticmethod
    def _config_error(err: Exception) -> None:
        # A config problem, not a bug: say what is wrong without a traceback.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
