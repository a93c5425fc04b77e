"""The LightningModule: one training stage of an LMM (freeze policy, learning rates, logging)
plus generation-based validation and testing."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Optional

import lightning as L
import torch

from lmm.checkpoint import load_weights, save_weights
from lmm.data.encode import Processor
from lmm.eval.results import is_correct, score_eval_set, summary_table
from lmm.model.freeze import FreezeConfig, parameter_table
from lmm.model.language import LanguageConfig
from lmm.model.lmm import LMM
from lmm.model.vision import VisionConfig

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
        warmup_ratio: Share of the total steps spent in linear warmup.
        min_lr_ratio: Final learning rate as a share of the peak (cosine end point).
    """

    lr_vision: float = 2e-5
    lr_connector: float = 1e-3
    lr_llm: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0


@dataclass
class GenerationConfig:
    """Decoding used by validation, test and predict.

    Args:
        max_new_tokens: Longest answer generated.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
    """

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


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
        connector: Connector registry name (``linear``, ``mlp2x_gelu``, ``identity``, ...).
        freeze: Freeze policy per component for this stage.
        optim: Optimizer and learning-rate schedule.
        generation: Decoding settings for validation/test.
        init_from: Weights file (safetensors) from an earlier stage to start from.
        save_weights: Where to write the weights (safetensors) when fit ends.
        save_trainable_only: Write only the trainable parameters (small stage-1 files).
        results_dir: Where ``test`` writes metrics and predictions (default: the log dir).
        val_examples: Images with question, reference and answer shown in TensorBoard per validation.
    """

    def __init__(
        self,
        vision: VisionConfig = VisionConfig(),
        llm: LanguageConfig = LanguageConfig(),
        connector: str = "mlp2x_gelu",
        freeze: FreezeConfig = FreezeConfig(),
        optim: OptimConfig = OptimConfig(),
        generation: GenerationConfig = GenerationConfig(),
        init_from: Optional[str] = None,
        save_weights: Optional[str] = None,
        save_trainable_only: bool = False,
        results_dir: Optional[str] = None,
        val_examples: int = 8,
    ) -> None:
        super().__init__()
        vision, llm = _as(VisionConfig, vision), _as(LanguageConfig, llm)
        self.freeze_cfg = _as(FreezeConfig, freeze)
        self.optim_cfg = _as(OptimConfig, optim)
        self.gen_cfg = _as(GenerationConfig, generation)
        # Plain dicts only: the checkpoint stays loadable with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "vision": asdict(vision),
                "llm": asdict(llm),
                "connector": connector,
                "freeze": asdict(self.freeze_cfg),
                "optim": {**asdict(self.optim_cfg), "betas": list(self.optim_cfg.betas)},
                "generation": asdict(self.gen_cfg),
                "init_from": init_from,
            }
        )
        self.model = LMM(vision, llm, connector)
        self.model.train()  # from_pretrained returns modules in eval mode
        if init_from:
            loaded = load_weights(self.model, init_from)
            log.info("initialised %d tensors from %s", len(loaded), init_from)
        self.param_table = self.model.apply_freeze(self.freeze_cfg)
        self.save_weights_path = save_weights
        self.save_trainable_only = save_trainable_only
        self.results_dir = results_dir
        self.val_examples = val_examples
        self.skipped: Counter[str] = Counter()
        self._step_started: float | None = None
        self._eval_records: dict[str, list[dict]] = defaultdict(list)
        self._eval_kinds: dict[str, str] = {}
        self.test_metrics: dict[str, Any] = {}

    @property
    def processor(self) -> Processor:
        """What the data side needs from the model (linked into the DataModule by the CLI)."""
        m = self.model
        return Processor(m.tokenizer, m.vision.image_spec, m.num_image_tokens, m.image_token_id)

    # -- fit ------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        table, counts = parameter_table(self.model.components())
        self.print(f"Parameters for this stage (freeze: {asdict(self.freeze_cfg)}):\n{table}")
        if self.logger is not None:
            if hasattr(self.logger.experiment, "add_text"):
                self.logger.experiment.add_text("parameters", f"```\n{table}\n```", 0)
            flat = {f"params/{n}_{k}": float(c[k]) for n, c in counts.items() for k in ("trainable", "frozen")}
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
                groups.append({"name": name, "params": decay, "lr": lrs[name], "weight_decay": cfg.weight_decay})
            if no_decay:
                groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lrs[name], "weight_decay": 0.0})
        if not groups:
            raise ValueError("model.freeze leaves no trainable parameter in this stage")
        optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.betas))
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer.max_steps: shard streams have no fixed length for the LR schedule")
        warmup = int(cfg.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
        loss = self.model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["size"])
        for group in self.trainer.optimizers[0].param_groups:
            if not group["name"].endswith("_no_decay"):
                self.log(f"lr/{group['name']}", group["lr"])
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._step_started is None:
            self._step_started = time.perf_counter()

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
            grads = [torch.linalg.vector_norm(p.grad.float()) for p in module.parameters() if p.grad is not None]
            if grads:
                norms[name] = torch.linalg.vector_norm(torch.stack(grads))
        if norms:
            for name, norm in norms.items():
                self.log(f"grad_norm/{name}", norm)
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(list(norms.values()))))

    def on_fit_end(self) -> None:
        if self.skipped:
            self.print(f"Skipped samples by reason: {dict(self.skipped)}")
        if self.save_weights_path and self.trainer.is_global_zero:
            n = save_weights(self.model, self.save_weights_path, self.save_trainable_only)
            self.print(f"Wrote {n} tensors to {self.save_weights_path}")

    # -- generation-based evaluation ---------------------------------------------------------

    def _generate(self, batch: dict) -> list[str]:
        g = self.gen_cfg
        out = self.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            max_new_tokens=g.max_new_tokens,
            do_sample=g.do_sample,
            temperature=g.temperature,
            top_p=g.top_p,
        )
        return [t.strip() for t in self.model.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _record(self, batch: dict) -> list[dict]:
        self._count_skips(batch)
        if batch["size"] == 0:
            return []
        answers = self._generate(batch)
        eval_set = batch["eval_set"]
        self._eval_kinds[eval_set["name"]] = eval_set["kind"]
        records = []
        for meta, answer in zip(batch["meta"], answers):
            records.append(
                {
                    "question_id": meta.get("question_id", meta["id"]),
                    "question": _last_question(meta["conversations"]),
                    "text": answer,
                    "answer": str(meta.get("answer", meta.get("label", ""))),
                    "category": meta.get("category", eval_set["kind"]),
                }
            )
        self._eval_records[eval_set["name"]].extend(records)
        return records

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        records = self._record(batch)
        if batch_idx == 0 and records:
            self._log_examples(batch, records)

    def on_validation_epoch_end(self) -> None:
        records = [r for rs in self._eval_records.values() for r in rs]
        if records:
            acc = sum(is_correct(r["text"], r["answer"], r["category"]) for r in records) / len(records)
            self.log("val/accuracy", acc, prog_bar=True)
        self._eval_records.clear()

    def _log_examples(self, batch: dict, records: list[dict]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_figure") or batch["pixel_values"].shape[0] == 0:
            return
        from lmm.viz import examples_figure

        fig = examples_figure(batch, records, self.model.vision.image_spec, self.model.num_image_tokens,
                              self.model.image_token_id, self.val_examples)
        experiment.add_figure("val/examples", fig, self.global_step)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record(batch)

    def on_test_epoch_end(self) -> None:
        per_set = dict(self._eval_records)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, per_set)
            per_set = defaultdict(list)
            for part in gathered:
                for name, recs in part.items():
                    per_set[name].extend(recs)
        metrics = {name: score_eval_set(self._eval_kinds.get(name, "short_answer"), recs) for name, recs in per_set.items()}
        pope = [m["f1"] for n, m in metrics.items() if self._eval_kinds.get(n) == "pope"]
        if pope:
            metrics["pope_mean_f1"] = sum(pope) / len(pope)
        if self.skipped:
            metrics["skipped"] = dict(self.skipped)
        self._eval_records.clear()
        self.test_metrics = metrics
        if not self.trainer.is_global_zero:
            return
        if self.logger is not None:  # once per set, not once per dataloader as self.log would
            scalars = {f"test/{name}/{k}": float(v) for name, m in metrics.items() if isinstance(m, dict)
                       for k, v in m.items() if isinstance(v, (int, float)) and k != "n"}
            self.logger.log_metrics(scalars, step=self.global_step)
        out_dir = self.results_dir or self.trainer.log_dir or "."
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        for name, recs in per_set.items():
            with open(os.path.join(out_dir, f"predictions_{name}.jsonl"), "w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
        self.print(summary_table(metrics))
        self.print(f"Wrote metrics and predictions to {out_dir}")
