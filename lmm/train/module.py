"""The LightningModule: one training stage of an LMM (freeze policy, learning rates, logging)
plus generation-based validation and testing."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import lightning as L
import torch

from lmm.checkpoints.directory import save_checkpoint_dir
from lmm.checkpoints.weights import load_weights, save_weights
from lmm.data.encode import Processor
from lmm.data.templates import stop_token_ids
from lmm.errors import CheckpointMismatchError
from lmm.eval.results import is_correct, pooled_pope_auc, score_eval_set, summary_table
from lmm.inference.likelihood import Candidates, candidate_probs, candidates_for
from lmm.inference.ordering import gather_in_order
from lmm.model.connectors import ConnectorConfig, as_connector_config
from lmm.model.efficiency import EfficiencyConfig, checkpoint_blocks, compile_blocks
from lmm.model.freeze import FreezeConfig, parameter_table
from lmm.model.language import LanguageConfig, decoder_blocks
from lmm.model.lmm import LMM, GenerationConfig  # noqa: F401  (GenerationConfig: CLI type)
from lmm.model.towers import VisionConfig
from lmm.train.parallel import full_state_dict, global_norm, is_sharded
from lmm.train.results import write_test_results
from lmm.train.rng import rng_state, set_rng_state
from lmm.train.schedule import WarmupStyle, warmup_cosine
from lmm.visual.image_batch import tower_inputs

log = logging.getLogger("lmm")


@dataclass
class OptimConfig:
    """AdamW with per-component learning rates and a warmup + cosine schedule.

    Args:
        lr_vision: Learning rate of the vision tower's trainable parameters.
        lr_connector: Learning rate of the connector.
        lr_llm: Learning rate of the language model's trainable parameters.
        weight_decay: Decoupled weight decay on matrices (biases and norms get none).
        betas: Adam betas.
        warmup_ratio: Share of the total steps spent in linear warmup. The total is the
            Trainer's ``estimated_stepping_batches``: ``trainer.max_steps`` when set, else
            ``trainer.max_epochs`` x the training loader's batches per epoch (known from the
            shards' manifests, see ``lmm.data.shards.PlannedStream``) / gradient accumulation.
        min_lr_ratio: Final learning rate as a share of the peak (cosine end point).
        warmup_style: ``hf_trainer`` (default): as transformers' Trainer schedules LLaVA,
            TinyLLaVA and OneVision: ``ceil(warmup_ratio x total)`` warmup steps, the lr rising
            as ``step / warmup`` from 0 at the first update. ``lmm``: ``int(warmup_ratio x
            total)`` steps rising as ``(step + 1) / warmup`` (the first update already
            moves). See ``lmm.train.schedule``.
    """

    lr_vision: float = 2e-5
    lr_connector: float = 1e-3
    lr_llm: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    warmup_style: WarmupStyle = "hf_trainer"


def _last_question(conversations: list[dict]) -> str:
    return next(t["value"] for t in reversed(conversations) if t.get("from") in ("human", "user"))


def _as(cls, value):
    """Accept a dataclass or its dict form (Lightning checkpoints store plain dicts)."""
    return cls(**value) if isinstance(value, dict) else value


class LMMModule(L.LightningModule):
    """Vision tower + connector + LLM, trained or evaluated as one stage.

    Args:
        vision: The vision tower.
        llm: The language model and tokenizer.
        connector: A connector name (``linear``, ``mlp2x_gelu``, ``resampler``, ``pixel_shuffle``, ...) or a
            name with options, e.g. ``{name: resampler, num_queries: 64}`` (fields: ``--model.connector.help
            ConnectorConfig``).
        freeze: Freeze policy per component for this stage.
        optim: Optimizer and learning-rate schedule.
        generation: Decoding settings for validation/test.
        init_from: Weights file (safetensors) from an earlier stage to start from. LoRA adapters in
            it are merged into the weights they adapt.
        save_weights: Where to write the weights (safetensors) when fit ends. Under a ``lora``
            policy the full file holds the merged weights.
        save_trainable_only: Write only the trainable parameters (small stage-1 files; under
            ``lora``, the adapters and whatever else trained).
        save_checkpoint_dir: Directory to write a self-contained lmm checkpoint (parts, tokenizer,
            template, generation defaults) when fit ends: what ``chat``, ``predict`` and ``export``
            load with ``--ckpt``.
        checkpoint_trainable_only: What Lightning checkpoints (``ModelCheckpoint``, ``--ckpt_path``)
            hold of the model: ``true`` only the trainable parameters (small stage-1 files; the
            frozen ones are rebuilt from the configured models and ``init_from`` on resume),
            ``false`` every weight, ``null`` (default) trainable-only when a whole component is
            frozen. Optimizer, scheduler, step, data position and random state are always saved.
        efficiency: Activation checkpointing, ``torch.compile`` and the loss chunk size.
        results_dir: Where ``test`` writes metrics and predictions (default: the log dir).
        val_examples: Images with question, reference and answer shown in TensorBoard per validation.
    """

    def __init__(
        self,
        vision: VisionConfig = VisionConfig(),
        llm: LanguageConfig = LanguageConfig(),
        connector: Union[str, ConnectorConfig] = "mlp2x_gelu",
        freeze: FreezeConfig = FreezeConfig(),
        optim: OptimConfig = OptimConfig(),
        generation: GenerationConfig = GenerationConfig(),
        init_from: Optional[str] = None,
        save_weights: Optional[str] = None,
        save_trainable_only: bool = False,
        save_checkpoint_dir: Optional[str] = None,
        checkpoint_trainable_only: Optional[bool] = None,
        efficiency: EfficiencyConfig = EfficiencyConfig(),
        results_dir: Optional[str] = None,
        val_examples: int = 8,
    ) -> None:
        super().__init__()
        vision, llm = _as(VisionConfig, vision), _as(LanguageConfig, llm)
        self.freeze_cfg = _as(FreezeConfig, freeze)
        self.optim_cfg = _as(OptimConfig, optim)
        self.gen_cfg = _as(GenerationConfig, generation)
        self.efficiency = _as(EfficiencyConfig, efficiency)
        # Plain dicts only: the checkpoint stays loadable with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "vision": asdict(vision),
                "llm": asdict(llm),
                "connector": connector
                if isinstance(connector, str)
                else asdict(as_connector_config(connector)),
                "freeze": asdict(self.freeze_cfg),
                "optim": {**asdict(self.optim_cfg), "betas": list(self.optim_cfg.betas)},
                "generation": asdict(self.gen_cfg),
                "init_from": init_from,
            }
        )
        self.model = LMM(vision, llm, connector)
        self.model.loss_chunk_size = self.efficiency.loss_chunk_size
        self.model.train()  # from_pretrained returns modules in eval mode
        if init_from:
            loaded = load_weights(self.model, init_from)
            log.info("initialised %d tensors from %s", len(loaded), init_from)
        self.param_table = self.model.apply_freeze(self.freeze_cfg)
        if checkpoint_trainable_only is None:
            checkpoint_trainable_only = "frozen" in (
                self.freeze_cfg.vision,
                self.freeze_cfg.connector,
                self.freeze_cfg.llm,
            )
        self.checkpoint_trainable_only = checkpoint_trainable_only
        # Frozen weights are absent from a trainable-only checkpoint (checked in on_load_checkpoint).
        self.strict_loading = not checkpoint_trainable_only
        self._configured = False
        self.save_weights_path = save_weights
        self.save_trainable_only = save_trainable_only
        self.save_checkpoint_dir = save_checkpoint_dir
        self.results_dir = results_dir
        self.val_examples = val_examples
        self.skipped: Counter[str] = Counter()
        self._step_started: float | None = None
        self._resume_rng: Optional[list[dict]] = None  # random states from a checkpoint, per rank
        self._eval_records: dict[str, list[dict]] = defaultdict(list)
        self._eval_sets: dict[str, dict] = {}  # name -> EvalSet.scoring_options()
        self._candidates: dict[tuple[str, ...], Candidates] = {}
        self.test_metrics: dict[str, Any] = {}

    @property
    def processor(self) -> Processor:
        """What the data side needs from the model (linked into the DataModule by the CLI)."""
        m = self.model
        return Processor(
            m.tokenizer, m.vision.image_spec, m.num_image_tokens, m.image_token_id, m.image_layout
        )

    # -- fit ------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Sharding (FSDP2 under ``ModelParallelStrategy``), then activation checkpointing and
        compilation per block, once per module (Lightning calls this before fit/validate/test)."""
        if self._configured:
            return
        self._configured = True
        mesh = self.device_mesh
        if mesh is not None:
            from lmm.train.parallel import shard_fsdp2

            dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            units = shard_fsdp2(self.model, dp)
            log.info("FSDP2: %d block units + root sharded over %d processes", units, dp.size())
        eff, m = self.efficiency, self.model
        if eff.grad_checkpointing_vision:
            checkpoint_blocks(m.vision.blocks())
        if eff.grad_checkpointing_llm:
            checkpoint_blocks(decoder_blocks(m.llm))
        if eff.compile:
            compile_blocks(
                [*m.vision.blocks(), *decoder_blocks(m.llm)],
                eff.compile_backend,
                eff.compile_dynamic,
            )

    def on_fit_start(self) -> None:
        table, counts = parameter_table(self.model.components())
        self.print(f"Parameters for this stage (freeze: {self.freeze_cfg.describe()}):\n{table}")
        if self.logger is not None:
            if hasattr(self.logger.experiment, "add_text"):
                self.logger.experiment.add_text("parameters", f"```\n{table}\n```", 0)
            flat = {
                f"params/{n}_{k}": float(c[k])
                for n, c in counts.items()
                for k in ("trainable", "frozen")
            }
            self.logger.log_metrics(flat, step=0)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        lrs = {"vision": cfg.lr_vision, "connector": cfg.lr_connector, "llm": cfg.lr_llm}
        groups = []
        for name, module in self.model.components().items():
            params = [p for p in module.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            if decay:
                groups.append(
                    {
                        "name": name,
                        "params": decay,
                        "lr": lrs[name],
                        "weight_decay": cfg.weight_decay,
                    }
                )
            if no_decay:
                groups.append(
                    {
                        "name": f"{name}_no_decay",
                        "params": no_decay,
                        "lr": lrs[name],
                        "weight_decay": 0.0,
                    }
                )
        if not groups:
            raise ValueError("model.freeze leaves no trainable parameter in this stage")
        optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.betas))
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            # The training loader has a length (PlannedStream), so this is only an unbounded run
            # (max_steps: -1 with max_epochs: -1), which leaves the schedule nothing to decay over.
            raise ValueError(
                "the LR schedule needs a finite number of steps: set trainer.max_steps or trainer.max_epochs"
            )
        factor = warmup_cosine(int(total), cfg.warmup_ratio, cfg.min_lr_ratio, cfg.warmup_style)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _count_skips(self, batch: dict) -> None:
        new = batch.get("skipped") or {}
        if new:
            self.skipped.update(new)
            for reason, n in self.skipped.items():
                self.log(f"skipped/{reason}", float(n), reduce_fx="max")

    def training_step(self, batch: dict, batch_idx: int):
        self._count_skips(batch)
        if batch["size"] == 0:
            # Every sample was skipped (and counted). A zero loss over the trainable weights
            # keeps this step in lockstep with the other ranks under DDP.
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        loss = self.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            batch["pixel_values"],
            batch.get("position_ids"),
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["size"])
        for group in self.trainer.optimizers[0].param_groups:
            if not group["name"].endswith("_no_decay"):
                self.log(f"lr/{group['name']}", group["lr"])
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resume_rng is not None:
            self._restore_rng()
        if self._step_started is None:
            self._step_started = time.perf_counter()

    # -- exact resume: random state ------------------------------------------------------------
    # Lightning checkpoints hold weights, optimizer, scheduler and loop state but not the random
    # state, so after a resume dropout (e.g. LoRA's) would draw other masks than the
    # uninterrupted run and the weights would drift apart. Each rank's state is saved with the
    # checkpoint and restored just before the first resumed training step: whatever ran in
    # between (setup, sanity validation) cannot shift it. The data loaders draw their worker
    # seeds from their own generators (lmm.data.shards), not from this state.

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = rng_state()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(
                states, state
            )  # every rank runs this hook (Lightning saves on all ranks)
        else:
            states = [state]
        checkpoint["rng_states"] = states
        if self.checkpoint_trainable_only:
            keep = self._trainable_state_keys()
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if k in keep
            }
            checkpoint["lmm_trainable_only"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_rng = checkpoint.get("rng_states")
        if checkpoint.get("lmm_trainable_only") and not self.checkpoint_trainable_only:
            raise CheckpointMismatchError(
                "this checkpoint holds only the trainable weights of its stage; resume it with "
                "model.checkpoint_trainable_only=true and the same models, init_from and freeze policy"
            )
        if self.checkpoint_trainable_only:
            missing = sorted(self._trainable_state_keys() - set(checkpoint.get("state_dict", {})))
            if missing:
                raise CheckpointMismatchError(
                    f"the checkpoint lacks {len(missing)} weight(s) this stage trains, e.g. {missing[:3]}: it was "
                    "saved under another freeze policy (resume with the policy it was trained with)"
                )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            if "Error(s) in loading state_dict" not in str(err):
                raise
            # torch lists every key; the first few say enough.
            lines = str(err).replace("\n\t", "\n").splitlines()[1:4]
            raise CheckpointMismatchError(
                f"its weights do not fit this model ({' '.join(line[:200] for line in lines)}): resume "
                "it with the models, connector and freeze policy it was trained with"
            ) from None

    def _trainable_state_keys(self) -> set[str]:
        """State-dict keys of the parameters this stage trains."""
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore_rng(self) -> None:
        states, self._resume_rng = self._resume_rng, None
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if len(states) == world:
            set_rng_state(states[rank])
        else:
            log.warning(
                "the checkpoint's random state is from %d process(es), this run has %d: not restored, so "
                "dropout draws other masks than the uninterrupted run would have",
                len(states),
                world,
            )

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        elapsed, self._step_started = now - self._step_started, now
        if batch["size"] and elapsed > 0:
            self.log("train/samples_per_s", batch["size"] / elapsed)
            self.log("train/tokens_per_s", float(batch["attention_mask"].sum()) / elapsed)

    def on_before_optimizer_step(self, optimizer) -> None:
        # A norm per parameter tensor costs real time on small CPU steps; the logger only
        # writes every log_every_n_steps, so compute on those steps alone (Lightning's own rule).
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        norms = {}
        for name, module in self.model.components().items():
            grads = [global_norm(p.grad) for p in module.parameters() if p.grad is not None]
            if grads:
                norms[name] = torch.linalg.vector_norm(torch.stack(grads))
        if norms:
            for name, norm in norms.items():
                self.log(f"grad_norm/{name}", norm)
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(list(norms.values()))))

    def on_fit_end(self) -> None:
        if self.skipped:
            self.print(f"Skipped samples by reason: {dict(self.skipped)}")
        sharded = is_sharded(self.model)
        if self.save_weights_path:
            state = full_state_dict(self.model) if sharded else None  # a collective: every rank
            if self.trainer.is_global_zero:
                n = save_weights(
                    self.model, self.save_weights_path, self.save_trainable_only, state=state
                )
                self.print(f"Wrote {n} tensors to {self.save_weights_path}")
        if self.save_checkpoint_dir and sharded:
            raise ValueError(
                "model.save_checkpoint_dir is not written from a sharded (FSDP2) model; set model.save_weights "
                "instead and build the directory with `python -m lmm checkpoint`"
            )
        if self.save_checkpoint_dir and self.trainer.is_global_zero:
            self._write_checkpoint_dir()

    def _write_checkpoint_dir(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        template = getattr(dm, "template", None)
        if template is None:
            raise ValueError(
                "model.save_checkpoint_dir needs the LMMDataModule (its template goes into the checkpoint)"
            )
        hp = self.hparams
        out = save_checkpoint_dir(
            self.model,
            self.save_checkpoint_dir,
            vision=VisionConfig(**hp["vision"]),
            llm=LanguageConfig(**hp["llm"]),
            connector=hp["connector"],
            template=template,
            max_length=dm.max_length,
            generation=self.gen_cfg,
            conventions=dm.prompt_conventions(),
        )
        self.print(f"Wrote lmm checkpoint directory {out} (python -m lmm chat --ckpt {out})")

    # -- generation-based evaluation ---------------------------------------------------------

    def _stop_token_ids(self) -> list[int]:
        """The template's end-of-turn token, so answers stop where training taught them to.

        ``stop_token_ids`` binds the template to the tokenizer first: for the ``tokenizer``
        template that is the chat template's end-of-turn (Gemma-it's ``<end_of_turn>``,
        ChatML's ``<|im_end|>``), not only eos."""
        if getattr(self, "_stop_ids", None) is None:
            template = getattr(getattr(self.trainer, "datamodule", None), "template", None)
            self._stop_ids = (
                stop_token_ids(self.model.tokenizer, template) if template is not None else []
            )
        return self._stop_ids

    def _generate(self, batch: dict, max_new_tokens: Optional[int] = None) -> list[str]:
        kwargs = self.gen_cfg.kwargs()
        if max_new_tokens:
            kwargs["max_new_tokens"] = max_new_tokens
        return self.model.generate_text(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            stop_token_ids=self._stop_token_ids(),
            **kwargs,
        )

    def _likelihood(self, batch: dict, labels: list[str]) -> list[dict[str, float]]:
        """Each candidate's probability per prompt, renormalised over the candidates
        (``lmm.inference.likelihood``; one forward pass)."""
        key = tuple(labels)
        if key not in self._candidates:
            template = getattr(getattr(self.trainer, "datamodule", None), "template", None)
            if template is None:
                raise ValueError("likelihood scoring needs the LMMDataModule's template")
            self._candidates[key] = candidates_for(self.model.tokenizer, template, key)
        return candidate_probs(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            [self._candidates[key]] * batch["input_ids"].shape[0],
        )

    def _record(self, batch: dict) -> list[dict]:
        self._count_skips(batch)
        if batch["size"] == 0:
            return []
        eval_set = batch["eval_set"]
        self._eval_sets[eval_set["name"]] = eval_set
        probs: list[Optional[dict[str, float]]] = [None] * batch["size"]
        if eval_set.get("scoring") == "likelihood":
            probs = list(self._likelihood(batch, eval_set["candidates"]))
            answers = [max(p, key=p.get) for p in probs]
        else:
            answers = self._generate(batch, eval_set.get("max_new_tokens"))
        records = []
        orders = batch.get("order") or [None] * len(answers)
        for meta, answer, order, p in zip(batch["meta"], answers, orders, probs):
            record = {
                "order": order,  # place in the unsplit eval set; dropped after the gather
                "question_id": meta.get("question_id", meta["id"]),
                "question": _last_question(meta["conversations"]),
                "text": answer,
                "answer": str(meta.get("answer", meta.get("label", ""))),
                "category": meta.get("category", eval_set["kind"]),
            }
            if p is not None:
                record["probs"] = p
            if eval_set["kind"] == "chair":
                if not isinstance(meta.get("gt_objects"), list):
                    raise ValueError(
                        f"eval set {eval_set['name']!r} (kind chair): sample {meta['id']!r} has no "
                        "'gt_objects' list (the image's object words)"
                    )
                record["gt_objects"] = meta["gt_objects"]
            records.append(record)
        self._eval_records[eval_set["name"]].extend(records)
        return records

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        records = self._record(batch)
        if batch_idx == 0 and records:
            self._log_examples(batch, records)

    def on_validation_epoch_end(self) -> None:
        records = [r for rs in self._eval_records.values() for r in rs]
        if records:
            acc = sum(is_correct(r["text"], r["answer"], r["category"]) for r in records) / len(
                records
            )
            self.log("val/accuracy", acc, prog_bar=True)
        self._eval_records.clear()

    def _log_examples(self, batch: dict, records: list[dict]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if (
            not hasattr(experiment, "add_figure")
            or tower_inputs(batch["pixel_values"]).shape[0] == 0
        ):
            return
        from lmm.train.viz import examples_figure

        fig = examples_figure(
            batch,
            records,
            self.model.vision.image_spec,
            self.model.num_image_tokens,
            self.model.image_token_id,
            self.val_examples,
        )
        experiment.add_figure("val/examples", fig, self.global_step)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record(batch)

    def _gather_sets(self) -> dict[str, dict]:
        """Eval sets (name -> options) seen on any rank (a rank may get no sample of a small set)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return dict(self._eval_sets)
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, dict(self._eval_sets))
        sets: dict[str, dict] = {}
        for part in gathered:  # same merge order on every rank: the gathers below line up
            sets.update(part)
        return sets

    def on_test_epoch_end(self) -> None:
        # Every rank (and dataloader worker) saw a different slice of each set: gather them
        # and restore the sets' original order, so prediction files and "first N" views
        # do not depend on the number of devices or workers.
        self._eval_sets = self._gather_sets()
        per_set = {
            name: gather_in_order(self._eval_records.get(name, [])) for name in self._eval_sets
        }
        metrics = {
            name: score_eval_set(
                self._eval_sets[name]["kind"], recs, self._eval_sets[name].get("synonyms")
            )
            for name, recs in per_set.items()
        }
        pope_sets = [n for n in metrics if self._eval_sets[n]["kind"] == "pope"]
        if pope_sets:
            metrics["pope_mean_f1"] = sum(metrics[n]["f1"] for n in pope_sets) / len(pope_sets)
            auc = pooled_pope_auc([r for n in pope_sets for r in per_set[n]])
            if auc is not None:  # likelihood-scored: vlm-evaluation's AUC on the pooled splits
                metrics["pope_auc_roc"] = auc
        if self.skipped:
            metrics["skipped"] = dict(self.skipped)
        self._eval_records.clear()
        self.test_metrics = metrics
        if not self.trainer.is_global_zero:
            return
        if self.logger is not None:  # once per set, not once per dataloader as self.log would
            scalars = {
                f"test/{name}/{k}": float(v)
                for name, m in metrics.items()
                if isinstance(m, dict)
                for k, v in m.items()
                if isinstance(v, (int, float)) and k != "n"
            }
            self.logger.log_metrics(scalars, step=self.global_step)
        out_dir = write_test_results(
            self.results_dir or self.trainer.log_dir or ".", metrics, per_set
        )
        self.print(summary_table(metrics))
        self.print(f"Wrote metrics and predictions to {out_dir}")
