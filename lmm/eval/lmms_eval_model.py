"""An lmms-eval model adapter: evaluate an lmm checkpoint directory on lmms-eval's benchmarks.

lmms-eval is not an lmm dependency (``pip install lmms-eval``). Run it through this module,
which registers the model as ``lmm`` and then hands the command line to lmms-eval::

    python -m lmm.eval.lmms_eval_model --model lmm --model_args ckpt=artifacts/tiny/finetune \\
        --tasks pope,mme --batch_size 16 --output_path results/

or from Python::

    from lmms_eval.evaluator import simple_evaluate
    from lmm.eval.lmms_eval_model import LMMEvalModel
    simple_evaluate(model=LMMEvalModel(ckpt="artifacts/tiny/finetune", batch_size=16), tasks=["pope"])

``model_args`` (``key=value,...``): ``ckpt`` (required: an lmm checkpoint directory, see
``lmm/checkpoints/directory.py``), ``dtype`` (``float32`` | ``bfloat16`` | ``float16``; default
float32), ``max_new_tokens`` (used when a task gives none; default 128), ``max_length``
(longest prompt; default the checkpoint's). ``--batch_size`` and ``--device`` are lmms-eval's
own options. Under ``accelerate launch`` / ``torchrun`` each process uses ``cuda:LOCAL_RANK``
and lmms-eval splits and gathers the requests.

Requests are answered like ``lmm predict`` answers a question file: the checkpoint's
conversation template, ``<image>\\n`` before the question for each image the task's
``doc_to_visual`` gives (unless the text places ``<image>`` itself), batched generation with
left padding and the KV cache. ``generate_until`` honours the task's ``until`` strings,
``max_new_tokens``, ``temperature`` (> 0 samples), ``top_p`` and ``do_sample``;
``num_beams`` > 1 is not supported (greedy is used, with a warning). ``loglikelihood``
returns the summed log-probability of the continuation after the templated prompt (the
answer prefix of the template included, e.g. vicuna's space) and whether greedy decoding
would produce it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Optional

try:  # The adapter also works on plain request objects (``.args``) without lmms-eval.
    from lmms_eval.api.model import lmms as _LMMSBase
except ImportError:  # pragma: no cover - depends on the environment

    class _LMMSBase:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict, self.cache_hook = 0, 1, {}, None

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


log = logging.getLogger("lmm")

MODEL_NAME = "lmm"
_GEN_KEYS = {"until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams", "top_k"}


def _images(visuals: Any) -> list:
    """PIL images from a task's ``doc_to_visual`` result (anything else is refused)."""
    from PIL import Image

    flat: list = []
    for v in visuals or []:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    for v in flat:
        if not isinstance(v, Image.Image):
            raise ValueError(
                f"lmm answers about images; this task gives {type(v).__name__} visuals (video/audio?)"
            )
    return flat


class LMMEvalModel(_LMMSBase):
    """lmms-eval "simple" model backed by an lmm checkpoint directory (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        ckpt: str,
        batch_size: int | str = 1,
        device: Optional[str] = None,
        dtype: str = "float32",
        max_new_tokens: int | str = 128,
        max_length: Optional[int | str] = None,
        max_batch_size: Optional[int] = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"lmm model_args: unknown option(s) {sorted(unknown)}; known: ckpt, dtype, max_new_tokens, max_length"
            )
        import torch

        from lmm.inference.predictor import Predictor, load_for_inference

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            self._rank, self._world_size = int(os.environ.get("RANK", "0")), world
            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if str(batch_size).startswith("auto"):
            batch_size = 16  # no automatic search: a fixed, documented default
        self.batch_size_per_gpu = int(batch_size)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"lmm model_args: dtype must be float32, bfloat16 or float16, got {dtype!r}"
            )
        self.checkpoint = load_for_inference(ckpt, device, dtype)
        self.predictor = Predictor.from_checkpoint(self.checkpoint, self.batch_size_per_gpu)
        if max_length is not None:
            self.predictor.encoder.max_length = int(max_length)
        self.default_max_new_tokens = int(max_new_tokens)
        self._device = self.predictor.device

    # -- lmms-eval's attributes ----------------------------------------------------------------

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.predictor.model.tokenizer

    @property
    def model(self):
        return self.predictor.model

    # -- requests ------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise KeyError(
                f"lmms-eval request for {task}/{split}/{doc_id}: the document is not in model.task_dict "
                "(lmms-eval fills it before calling the model)"
            ) from None

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        return _images(doc_to_visual(self._doc(task, split, doc_id)))

    def _generation(self, gen_kwargs: dict):
        from dataclasses import replace

        unknown = set(gen_kwargs) - _GEN_KEYS
        if unknown:
            log.debug("lmms-eval gen_kwargs ignored by lmm: %s", sorted(unknown))
        if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            log.warning("lmm: num_beams > 1 is not supported; decoding greedily")
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
        g = replace(
            self.predictor.generation,
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens),
            do_sample=do_sample,
        )
        if do_sample:
            g = replace(g, temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0))
        return g

    def generate_until(self, requests) -> list[str]:
        """Answers for ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests, in order."""
        from lmm.errors import SampleError

        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            gen_kwargs = dict(req.args[1] or {})
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        for key, idx in groups.items():
            gen_kwargs = json.loads(key)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            generation = self._generation(gen_kwargs)
            samples, ok = [], []
            for i in idx:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                try:
                    samples.append(
                        self.predictor.encode_question(
                            context,
                            self._visuals(doc_to_visual, task, split, doc_id),
                            f"{task}/{doc_id}",
                        )
                    )
                    ok.append(i)
                except (SampleError, ValueError) as err:
                    log.warning("lmm: no answer for %s/%s: %s", task, doc_id, err)
                    results[i] = ""
            for i, text in zip(ok, self.predictor.generate_all(samples, generation)):
                for stop in until:  # the task's stop strings end the answer
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                results[i] = text
                hook = getattr(self, "cache_hook", None)
                if hook is not None:
                    hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), text)
        return [r if r is not None else "" for r in results]

    def _continuation_ids(self, turns: list[dict], continuation: str) -> list[int]:
        """Token ids of the continuation as they follow the templated prompt."""
        from lmm.data.templates import parse_conversation

        tok, template = self.tokenizer, self.predictor.template
        prompt, _ = template.render(
            parse_conversation(turns), tok.eos_token, add_generation_prompt=True
        )
        text = getattr(template, "answer_prefix", "") + continuation
        p_ids = tok(prompt)["input_ids"]
        w_ids = tok(prompt + text)["input_ids"]
        if w_ids[: len(p_ids)] == p_ids:  # tokenized together, as the model saw answers in training
            return w_ids[len(p_ids) :]
        return tok(text, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | prompt), greedy)`` for ``(context, doc_to_target,
        doc_to_visual, doc_id, task, split)`` requests."""
        import torch

        from lmm.data.collate import collate
        from lmm.inference.predictor import user_turn

        model = self.predictor.model
        items = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            target = (
                doc_to_target
                if isinstance(doc_to_target, str)
                else doc_to_target(self._doc(task, split, doc_id))
            )
            images = self._visuals(doc_to_visual, task, split, doc_id)
            turns = [{"from": "human", "value": user_turn(context, len(images))}]
            prompt = self.predictor.encode(turns, images, f"{task}/{doc_id}")
            cont = torch.tensor(self._continuation_ids(turns, str(target)), dtype=torch.long)
            if len(cont) == 0:
                raise ValueError(f"lmms-eval request {task}/{doc_id}: empty continuation")
            items.append(
                {**prompt, "input_ids": torch.cat([prompt["input_ids"], cont]), "n_cont": len(cont)}
            )
        out: list[tuple[float, bool]] = []
        dev = self.device
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            # Right padding: a plain forward numbers positions from 0, so padding must come last.
            batch = collate(chunk, pad_id=self.tokenizer.pad_token_id, left=False)
            with torch.no_grad():
                embeds = model.embed(batch["input_ids"].to(dev), batch["pixel_values"].to(dev))
                logits = model.llm(
                    inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(dev)
                ).logits.float()
            for row, item in enumerate(chunk):
                n, total = item["n_cont"], len(item["input_ids"])
                targets = item["input_ids"][total - n :].to(dev)
                logp = torch.log_softmax(logits[row, total - n - 1 : total - 1], dim=-1)
                score = float(logp.gather(-1, targets[:, None]).sum())
                greedy = bool((logp.argmax(-1) == targets).all())
                out.append((score, greedy))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "lmm's lmms-eval adapter answers single-round requests (generate_until)"
        )


def manifest():
    """lmms-eval model manifest (for the ``lmms_eval.models`` entry-point group)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.LMMEvalModel")


def register() -> None:
    """Make ``--model lmm`` known to this process's lmms-eval."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m lmm.eval.lmms_eval_model ARGS``: lmms-eval's command line with ``--model lmm`` registered."""
    try:
        from lmms_eval.__main__ import cli_evaluate
    except ImportError as err:
        print(
            f"error: lmms-eval or one of its dependencies is missing ({err}); pip install lmms-eval",
            file=sys.stderr,
        )
        return 2
    register()
    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
