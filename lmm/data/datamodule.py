"""The LightningDataModule: shard streams for fit, validation (generation) and test sets."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Literal, Optional

import lightning as L

from lmm.data.collate import collate
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.shards import ShardStream, expand_shards, make_loader
from lmm.data.templates import get_template


@dataclass
class EvalSet:
    """A held-out set scored by generation.

    Args:
        name: Name used in logs and result files (e.g. ``pope_random``).
        shards: Shard pattern(s) (brace/glob), e.g. ``data/test/pope_random/shard-*.tar``.
        kind: Scorer: ``pope`` (yes/no probing metrics) or ``short_answer`` (exact match).
    """

    name: str
    shards: str
    kind: Literal["pope", "short_answer"] = "short_answer"


class LMMDataModule(L.LightningDataModule):
    """Streams WebDataset shards in the LLaVA conversation schema.

    Args:
        train: Shard patterns (brace/glob) for training; their samples are pooled.
        val: Held-out set answered by generation at each validation.
        test: Held-out sets scored by ``lmm test``.
        template: Conversation template (``plain`` for pretraining, ``vicuna`` for chat).
        system_prompt: Replace the template's default system prompt ("" = none); a system
            turn inside a sample still wins.
        max_length: Token budget per sample after ``<image>`` expansion.
        batch_size: Training samples per batch and device.
        eval_batch_size: Prompts per generation batch.
        num_workers: Worker processes that decode, transform, tokenize and collate.
        shuffle_buffer: Samples held in the shuffle buffer of each worker (0 = no shuffle).
        seed: Seed of shard order and buffer shuffling (epoch-dependent, reproducible).
        blank_images: Replace every image by a blank one (control: are answers from the image?).
        processor: Tokenizer and image facts; linked from the model by the CLI.
    """

    def __init__(
        self,
        train: Optional[list[str]] = None,
        val: Optional[EvalSet] = None,
        test: Optional[list[EvalSet]] = None,
        template: str = "plain",
        system_prompt: Optional[str] = None,
        max_length: int = 512,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        blank_images: bool = False,
        processor: Optional[Processor] = None,
    ) -> None:
        super().__init__()
        self.train_patterns = list(train or [])
        self.val_set = val
        self.test_sets = list(test or [])
        self.template = get_template(template)
        if system_prompt is not None:
            self.template = replace(self.template, system=system_prompt)
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.blank_images = blank_images
        self.processor = processor

    # -- helpers ---------------------------------------------------------------------------

    def _encoder(self) -> SampleEncoder:
        if self.processor is None:
            raise RuntimeError("LMMDataModule needs a processor: pass processor=model.processor (the CLI links it)")
        return SampleEncoder(self.processor, self.template, self.max_length, self.blank_images)

    def _placement(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _pad_id(self) -> int:
        return self.processor.tokenizer.pad_token_id

    def _eval_loader(self, eval_set: EvalSet, option: str):
        enc = self._encoder()
        rank, world = self._placement()
        stream = ShardStream(
            expand_shards([eval_set.shards], option),
            encode=enc.prompt_sample,
            collate=partial(collate, pad_id=self._pad_id(), left=True),
            batch_size=self.eval_batch_size,
            rank=rank,
            world_size=world,
            extra={"eval_set": {"name": eval_set.name, "kind": eval_set.kind}},
        )
        return make_loader(stream, self.num_workers)

    # -- Lightning hooks -------------------------------------------------------------------

    def train_dataloader(self):
        if not self.train_patterns:
            raise ValueError("data.train: no training shards configured")
        enc = self._encoder()
        rank, world = self._placement()
        stream = ShardStream(
            expand_shards(self.train_patterns, "data.train"),
            encode=enc.train_sample,
            collate=partial(collate, pad_id=self._pad_id()),
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_shards=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )
        return make_loader(stream, self.num_workers)

    def val_dataloader(self):
        return [] if self.val_set is None else self._eval_loader(self.val_set, "data.val")

    def test_dataloader(self):
        if not self.test_sets:
            raise ValueError("data.test: no test sets configured")
        return [self._eval_loader(s, f"data.test[{i}]") for i, s in enumerate(self.test_sets)]
