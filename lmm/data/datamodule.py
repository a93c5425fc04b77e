"""The LightningDataModule: shard streams for fit, validation (generation) and test sets."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Literal, Optional, Union

import lightning as L

from lmm.data.collate import collate
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.image import DEFAULT_MAX_IMAGE_PIXELS
from lmm.data.mixing import MixIndex, ShardSet, as_shard_sets, describe_mix
from lmm.data.packing import pack
from lmm.data.placement import ImagePlacement
from lmm.data.prompts import PromptConventions
from lmm.data.quality import BadSampleMonitor
from lmm.data.shards import (
    PlannedStream,
    ResumableLoader,
    ShardStream,
    expand_shards,
    make_loader,
)
from lmm.data.templates import get_template
from lmm.data.tokenization import Tokenization
from lmm.errors import CheckpointMismatchError, ConfigError

log = logging.getLogger("lmm")


@dataclass
class EvalSet:
    """A held-out set, answered by generation or scored by likelihood.

    Args:
        name: Name used in logs and result files (e.g. ``pope_random``).
        shards: Shard pattern(s) (brace/glob), e.g. ``data/test/pope_random/shard-*.tar``.
        kind: Scorer: ``pope`` (yes/no probing metrics), ``short_answer`` (exact match) or
            ``chair`` (object hallucination of generated captions, CHAIR_s / CHAIR_i, against
            each sample's ``gt_objects``).
        scoring: ``generate`` (decode an answer) or ``likelihood`` (the most likely of
            ``candidates`` by the next-token probability where the answer starts, one forward
            pass per batch; records keep every candidate's probability, and ``pope`` sets
            report AUC-ROC over P(yes); see docs/evaluation.md).
        candidates: The answers ``likelihood`` compares (default for ``pope``: Yes, No).
        max_new_tokens: Longest generated answer for this set (default: ``model.generation``'s),
            e.g. longer for captions.
        synonyms: ``chair``: the synonym table file (one category per line, ``category,
            synonym, ...``); default: each distinct word of the set's ``gt_objects`` names its
            own category.
    """

    name: str
    shards: str
    kind: Literal["pope", "short_answer", "chair"] = "short_answer"
    scoring: Literal["generate", "likelihood"] = "generate"
    candidates: Optional[list[str]] = None
    max_new_tokens: Optional[int] = None
    synonyms: Optional[str] = None

    def __post_init__(self) -> None:
        if self.scoring == "likelihood" and self.kind == "chair":
            raise ConfigError(
                f"eval set {self.name!r}: chair scores generated captions (scoring: generate)"
            )
        if self.scoring == "likelihood" and not self.candidates and self.kind != "pope":
            raise ConfigError(
                f"eval set {self.name!r}: scoring: likelihood needs candidates (the answers to compare)"
            )
        if self.candidates is not None and self.scoring != "likelihood":
            raise ConfigError(f"eval set {self.name!r}: candidates are for scoring: likelihood")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"eval set {self.name!r}: max_new_tokens must be >= 1")

    def scoring_options(self) -> dict[str, Any]:
        """What the test step needs besides the samples (sent along with each batch)."""
        candidates = self.candidates or (["Yes", "No"] if self.scoring == "likelihood" else None)
        return {**asdict(self), "candidates": candidates}


class LMMDataModule(L.LightningDataModule):
    """Streams WebDataset shards in the LLaVA conversation schema.

    Training follows a deterministic epoch plan (see ``lmm.data.mixing``): shards of all
    sets are split across ranks and workers so that no two ranks see the same sample in an
    epoch and every rank gets the same number of batches; the position ("batches consumed in
    epoch e") is saved in Lightning checkpoints and a resumed run continues with exactly the
    batches the uninterrupted run would have seen.

    Args:
        train: Training shards: a list of shard patterns (brace/glob; each a set of weight 1)
            and/or weighted sets ``{shards: pattern(s), weight: 2.0, name: ...}``, e.g.
            ``[{shards: data/llava665k/shard-*.tar, weight: 1.0},
            {shards: data/sharegpt4v_cap100k/shard-*.tar, weight: 0.5}]``.
        val: Held-out set answered by generation at each validation.
        test: Held-out sets scored by ``lmm test``.
        template: Conversation template, a name from ``lmm.data.templates.TEMPLATES``:
            ``plain`` (pretraining: image, then caption and newline, no eos, as LLaVA and
            TinyLLaVA), ``plain_eos`` (caption and eos), the Vicuna-style chat format with
            each family's end-of-turn (``vicuna`` for Llama, ``phi`` for Phi-2 and StableLM-2,
            ``gemma``, ``qwen2_base``, ``qwen2_instruct``), ``chatml`` (Qwen2-Instruct; answer
            and ``<|im_end|>`` supervised), ``chatml_onevision`` (the same text supervised as
            LLaVA-OneVision does) or ``tokenizer`` (the tokenizer's own chat template).
        system_prompt: Replace the template's default system prompt ("" = none); a system
            turn inside a sample still wins.
        image_placement: Where each user turn's ``<image>`` placeholders go before the
            template renders it: ``llava`` (default; ``<image>\\n`` then the rest of the turn,
            stripped, as LLaVA and TinyLLaVA train), ``llava_next`` (only a single ``<image>``
            not already first is moved; several stay where written, as LLaVA-NeXT /
            OneVision) or ``as_written`` (where the sample puts them). See
            ``lmm.data.placement``.
        tokenization: How the rendered text becomes token ids: ``chunked`` (default; the
            text between ``<image>`` placeholders tokenized piece by piece with one bos, as
            LLaVA's ``tokenizer_image_token``: SentencePiece tokenizers start the text after
            an image with ``▁``) or ``single_pass`` (the whole text at once). Byte-level BPE
            tokenizers (Phi-2, Qwen2) give the same ids both ways. See
            ``lmm.data.tokenization``.
        image_position: Where the images of a bare question go when a prompt is built outside
            the shards (``predict``, ``chat``, the lmms-eval adapter read it from the checkpoint
            directory this run writes): ``before`` (LLaVA's ``<image>\\nquestion``) or ``after``
            (``question\\n<image>``). Set it to where the training data put the image; the
            shards' own samples are encoded as they are written.
        answer_suffixes: Per benchmark (``lmm score`` names), the answer instruction the
            reference appends to each question, e.g. ``{pope: "\\nAnswer the question using a
            single word or phrase."}``; recorded in the checkpoint directory, where
            ``predict --benchmark`` reads it. An imported model brings its reference's.
        max_length: Token budget per sample after ``<image>`` expansion.
        batch_size: Training samples per batch and device.
        eval_batch_size: Prompts per generation batch.
        num_workers: Worker processes that decode, transform, tokenize and collate (any
            number; it does not change which samples a batch holds).
        shuffle_buffer: ``0`` turns training shuffling off (shards and samples in stored
            order); any other value shuffles. Training shuffles by seeded permutations of
            shards and of samples within shards (what makes exact resume possible), not
            through a buffer; the size is kept so older configs keep working.
        seed: Seed of the epoch plan (shard order, sample order, subsets of fractional weights).
        group_by_length: Batch samples of similar length together, image and text-only samples
            apart (LLaVA's ``group_by_modality_length``). Lengths come from the shards'
            ``manifest.json`` (text tokens + images x tokens per image).
        group_window: Batches per grouping window: samples are sorted by length within windows
            of ``group_window x batch_size`` samples, then the window's batches are shuffled.
        pack_length: Pack each training batch's samples into rows of at most this many tokens
            (first-fit decreasing) instead of padding every sample to the longest; each
            sample keeps its own positions and attention block, so losses are unchanged and
            padding is not computed. ``None``: no packing. Must be >= ``max_length``.
        strict_resume: A checkpoint whose data position was saved with another mix, batch
            size, seed, grouping or number of devices is an error; ``false`` restarts that
            epoch from its first batch instead.
        blank_images: Replace every image by a blank one (control: are answers from the image?).
        max_image_pixels: Images with more pixels (width x height, read from the header before
            decoding) are skipped as ``image_too_large``: a decompression bomb is never decoded.
            PIL itself refuses above 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (179M) whatever this says.
        max_bad_fraction: Stop the run with a report (counts and examples per skip reason) when
            more than this share of the samples a stage (training, validation, test) was handed
            had to be skipped; 1.0 never stops. Single bad samples are skipped and counted.
        bad_fraction_min_samples: Samples a stage must have seen before ``max_bad_fraction`` is
            checked, so a few bad samples at the start are not taken for a rate.
        processor: Tokenizer and image facts; linked from the model by the CLI.
    """

    def __init__(
        self,
        train: Optional[list[Union[str, ShardSet]]] = None,
        val: Optional[EvalSet] = None,
        test: Optional[list[EvalSet]] = None,
        template: str = "plain",
        system_prompt: Optional[str] = None,
        image_placement: ImagePlacement = "llava",
        tokenization: Tokenization = "chunked",
        image_position: str = "before",
        answer_suffixes: Optional[dict[str, str]] = None,
        max_length: int = 512,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        group_by_length: bool = False,
        group_window: int = 16,
        pack_length: Optional[int] = None,
        strict_resume: bool = True,
        blank_images: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_bad_fraction: float = 0.1,
        bad_fraction_min_samples: int = 200,
        processor: Optional[Processor] = None,
    ) -> None:
        super().__init__()
        self.train_sets = as_shard_sets(list(train or []))
        self.val_set = val
        self.test_sets = list(test or [])
        self.template = get_template(template)
        if system_prompt is not None:
            self.template = replace(self.template, system=system_prompt)
        self.max_length = max_length
        self.image_placement = image_placement
        self.tokenization = tokenization
        self.image_position = image_position
        self.answer_suffixes = dict(answer_suffixes or {})
        self.prompt_conventions()  # validates image_position now, not when the run ends
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        if group_window < 1:
            raise ValueError(f"data.group_window must be >= 1, got {group_window}")
        self.group_by_length = group_by_length
        self.group_window = group_window
        if pack_length is not None and pack_length < max_length:
            raise ConfigError(
                f"data.pack_length={pack_length} is below data.max_length={max_length}: a row must hold the "
                "longest sample; raise pack_length (e.g. to a multiple of max_length) or unset it"
            )
        self.pack_length = pack_length
        self.strict_resume = strict_resume
        self.blank_images = blank_images
        if (
            max_image_pixels < 1
            or not 0.0 <= max_bad_fraction <= 1.0
            or bad_fraction_min_samples < 0
        ):
            raise ConfigError(
                f"data.max_image_pixels ({max_image_pixels}) must be >= 1, data.max_bad_fraction ({max_bad_fraction}) "
                f"within [0, 1] and data.bad_fraction_min_samples ({bad_fraction_min_samples}) >= 0"
            )
        self.max_image_pixels = max_image_pixels
        self.max_bad_fraction = max_bad_fraction
        self.bad_fraction_min_samples = bad_fraction_min_samples
        self._bad: dict[str, BadSampleMonitor] = {}  # per stage
        self.processor = processor
        self._train_loader: Optional[ResumableLoader] = None
        self._plan_key: Optional[dict] = None
        self._trained: Optional[tuple[int, int]] = None  # (epoch, batches) handed to training steps
        self._pending: Optional[dict] = None  # a loaded position not yet applied

    # -- helpers ---------------------------------------------------------------------------

    def prompt_conventions(self) -> PromptConventions:
        """What a checkpoint directory written from this run records about its prompts."""
        return PromptConventions(
            self.image_placement, self.tokenization, self.image_position, self.answer_suffixes
        )

    def _encoder(self) -> SampleEncoder:
        if self.processor is None:
            raise RuntimeError(
                "LMMDataModule needs a processor: pass processor=model.processor (the CLI links it)"
            )
        return SampleEncoder(
            self.processor,
            self.template,
            self.max_length,
            self.blank_images,
            self.max_image_pixels,
            image_placement=self.image_placement,
            tokenization=self.tokenization,
        )

    def bad_samples(self, stage: str) -> BadSampleMonitor:
        """The skip counts of ``stage`` (``training``, ``validation`` or ``test``)."""
        if stage not in self._bad:
            self._bad[stage] = BadSampleMonitor(
                stage, self.max_bad_fraction, self.bad_fraction_min_samples
            )
        return self._bad[stage]

    def _placement(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _pad_id(self) -> int:
        return self.processor.tokenizer.pad_token_id

    def _trainer_epoch(self) -> Optional[int]:
        return getattr(self.trainer, "current_epoch", None)

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
            extra={"eval_set": eval_set.scoring_options()},
            index_samples=True,  # results are put back in the set's order after the gather
        )
        return make_loader(stream, self.num_workers)

    # -- Lightning hooks -------------------------------------------------------------------

    def train_dataloader(self):
        if not self.train_sets:
            raise ValueError("data.train: no training shards configured")
        enc = self._encoder()
        rank, world = self._placement()
        index = MixIndex(self.train_sets, need_tokens=self.group_by_length)
        stream = PlannedStream(
            index,
            encode=enc.train_sample,
            collate=(
                partial(pack, pad_id=self._pad_id(), budget=self.pack_length)
                if self.pack_length
                else partial(collate, pad_id=self._pad_id())
            ),
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle_buffer != 0,
            rank=rank,
            world_size=world,
            group_window=self.group_window if self.group_by_length else 0,
            image_tokens=self.processor.num_image_tokens,
        )
        self._plan_key = {
            "mix": index.fingerprint(),
            "batch_size": self.batch_size,
            "world_size": world,
            "seed": self.seed,
            "shuffle": stream.shuffle,
            "group_window": stream.group_window,
        }
        log.info("training mix: %s", describe_mix(index, self.batch_size, world))
        # Our __len__ is exact per rank (every rank gets the same batches, split across workers
        # by the plan), which is what Lightning's generic IterableDataset warning doubts.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        self._train_loader = ResumableLoader(
            stream, self.num_workers, epoch_fn=self._trainer_epoch, state=self
        )
        if self._pending is not None:
            self._apply_pending()
        return self._train_loader

    def val_dataloader(self):
        return [] if self.val_set is None else self._eval_loader(self.val_set, "data.val")

    def test_dataloader(self):
        if not self.test_sets:
            raise ValueError("data.test: no test sets configured")
        return [self._eval_loader(s, f"data.test[{i}]") for i, s in enumerate(self.test_sets)]

    # -- exact resume ------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for the batch a training step is about to use (after Lightning's prefetch), so
        # this, not the loader's count, is what a checkpoint taken after that step has consumed.
        trainer = self.trainer
        training = getattr(trainer, "training", False)
        if isinstance(batch, dict) and "position" in batch and training:
            pos = batch["position"]
            self._trained = (int(pos["epoch"]), int(pos["index"]) + 1)
        if isinstance(batch, dict) and "skipped" in batch:
            stage = (
                "training"
                if training
                else "test"
                if getattr(trainer, "testing", False)
                else "validation"
            )
            self.bad_samples(stage).update(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training position: ``batches`` of epoch ``epoch`` consumed, plus the plan it refers
        to and the training skip counts (so the bad-sample rate continues across a resume)."""
        if self._trained is not None:
            epoch, batches = self._trained
        elif (
            self.trainer is None
            and self._train_loader is not None
            and self._train_loader.position is not None
        ):
            epoch, batches = self._train_loader.position  # no Trainer: what the loader handed out
        elif self._pending is not None:
            epoch, batches = int(self._pending["epoch"]), int(self._pending["batches"])
        else:
            return {}
        return {
            "epoch": epoch,
            "batches": batches,
            "plan": dict(self._plan_key or {}),
            "bad_samples": self.bad_samples("training").state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.bad_samples("training").load_state_dict(state_dict.get("bad_samples") or {})
        self._pending = dict(state_dict)
        self._trained = None
        if self._train_loader is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        state, loader = self._pending, self._train_loader
        saved = state.get("plan") or {}
        differs = {
            k: (saved[k], v)
            for k, v in (self._plan_key or {}).items()
            if k in saved and saved[k] != v
        }
        if differs:
            what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differs.items())
            if self.strict_resume:
                raise CheckpointMismatchError(
                    f"data: the checkpoint's data position (epoch {state['epoch']}, batch {state['batches']}) belongs "
                    f"to another epoch plan ({what}); exact resume needs the same data.train shards and weights, "
                    "data.batch_size, data.seed, shuffling, grouping and number of devices. Set "
                    "data.strict_resume=false to restart that epoch from its first batch instead."
                )
            log.warning("data: %s; epoch %s restarts from its first batch", what, state["epoch"])
            loader.resume = (int(state["epoch"]), 0)
        else:
            loader.resume = (int(state["epoch"]), int(state["batches"]))
