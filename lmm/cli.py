"""``python -m lmm fit|validate|test|predict``: a LightningCLI over LMMModule and LMMDataModule."""
from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from lmm.callbacks import ProgressLog
from lmm.data.datamodule import LMMDataModule
from lmm.model.loading import MissingWeightsError
from lmm.module import LMMModule
from lmm.registry import ConfigError


class LMMCLI(LightningCLI):
    """Every model/data/trainer field is a typed, documented option (``--help``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            LMMModule,
            LMMDataModule,
            seed_everything_default=0,
            trainer_defaults={"callbacks": [ProgressLog()]},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer, image size and tokens-per-image come from the built model.
        parser.link_arguments("model.processor", "data.processor", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ConfigError, MissingWeightsError, FileNotFoundError) as err:
            # A config problem, not a bug: say what is wrong without a traceback.
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
