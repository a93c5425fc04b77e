"""Evaluation throughput: batched, left-padded, KV-cached generation vs batch size 1.

Both are measured side by side in one process on the same prompts (after a warm-up batch),
greedy, with the same ``max_new_tokens``; the table gives samples/s per batch size and the
ratio to batch size 1, and checks that every batched answer equals the batch-size-1 answer.

Model (first that applies):
  1. ``--ckpt DIR``: an lmm checkpoint directory;
  2. ``artifacts/tiny/finetune`` if it is one (``python -m lmm tiny`` writes it, or
     ``python -m lmm checkpoint --config configs/tiny/finetune.yaml --out artifacts/tiny/finetune``);
  3. otherwise a random-init model of the tiny pipeline's sizes (``lmm.standins.tiny.TinySpec()``:
     SigLIP 48 px / 16 px patches -> 9 tokens, 4-layer 128-wide Llama), built in a temp dir.
     A random model never emits eos early, so every answer runs to ``max_new_tokens``.
Prompts: the held-out short-answer questions of ``artifacts/tiny/data/test/short_answer`` if
present (read and encoded exactly as ``lmm test`` does), else shapes-world images and
questions generated in memory.

    OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmm.inference.predictor import Predictor
from lmm.model.lmm import GenerationConfig

TINY_CKPT = Path("artifacts/tiny/finetune")
TINY_TEST = "artifacts/tiny/data/test/short_answer/shard-*.tar"


def load_model(ckpt: str | None, device: str) -> tuple[Predictor, str]:
    from lmm.checkpoints.directory import load_checkpoint_dir

    path = Path(ckpt) if ckpt else (TINY_CKPT if (TINY_CKPT / "lmm.json").is_file() else None)
    if path is not None:
        c = load_checkpoint_dir(path, device=device)
        return Predictor.from_checkpoint(c), f"checkpoint {path}"
    from lmm.data.templates import get_template
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM
    from lmm.model.towers import VisionConfig
    from lmm.standins.tiny import TinySpec, build_tiny_models
    from lmm.worlds.shapes.tiny import tiny_corpus

    with tempfile.TemporaryDirectory(
        prefix="lmm_bench_"
    ) as tmp:  # loaded into memory, then removed
        parts = build_tiny_models(Path(tmp), tiny_corpus(), TinySpec())
        torch.manual_seed(0)
        model = (
            LMM(
                VisionConfig(name_or_path=str(parts["vision"]), feature_layer=-1),
                LanguageConfig(name_or_path=str(parts["llm"])),
                "pixel_shuffle",
            )
            .eval()
            .to(device)
        )
    template = replace(get_template("vicuna"), system="")
    return Predictor(
        model, template, max_length=512
    ), "random-init tiny model (lmm.standins.tiny.TinySpec())"


def load_prompts(predictor: Predictor, n: int) -> tuple[list[dict], str]:
    shards = sorted(glob.glob(TINY_TEST))
    if shards:
        from lmm.data.shards import ShardStream

        stream = ShardStream(
            shards, predictor.encoder.prompt_sample, lambda s: {"samples": s}, batch_size=n
        )
        samples = next(iter(stream))["samples"][:n]
        return samples, f"{len(samples)} held-out short-answer prompts from {TINY_TEST}"
    from lmm.worlds.shapes.config import WorldConfig
    from lmm.worlds.shapes.scene import image_rng, render, sample_objects
    from lmm.worlds.shapes.text import short_answer_questions

    cfg, samples, i = WorldConfig(), [], 0
    while len(samples) < n:
        objects = sample_objects(cfg, image_rng(cfg, "bench", i, 0))
        image = render(cfg, objects)
        for question, _, _ in short_answer_questions(
            cfg, objects, image_rng(cfg, "bench", i, 1), i, 2
        ):
            samples.append(predictor.encode_question(question, [image], f"bench-{len(samples)}"))
        i += 1
    return samples[:n], f"{n} shapes-world prompts generated in memory"


def measure(
    predictor: Predictor, samples: list[dict], batch_size: int, generation: GenerationConfig
):
    predictor.generate_all(samples[:batch_size], generation, batch_size)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers = predictor.generate_all(samples, generation, batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return answers, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt", default=None, help="lmm checkpoint directory (default: see above)"
    )
    parser.add_argument("--samples", type=int, default=128, help="prompts answered per batch size")
    parser.add_argument(
        "--batch-sizes", default="8,32,64", help="batched sizes compared with batch size 1"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=8, help="tokens generated per answer (tiny config: 8)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    predictor, model_desc = load_model(args.ckpt, args.device)
    samples, prompt_desc = load_prompts(predictor, args.samples)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    lengths = [len(s["input_ids"]) for s in samples]
    print(f"model:   {model_desc}")
    print(
        f"prompts: {prompt_desc} ({min(lengths)}-{max(lengths)} tokens, "
        f"{predictor.model.num_image_tokens} image tokens each)"
    )
    print(
        f"device:  {args.device}, torch threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), greedy, max_new_tokens {args.max_new_tokens}\n"
    )

    sizes = [1] + [int(b) for b in args.batch_sizes.split(",") if int(b) != 1]
    rows, reference = [], None
    for bs in sizes:
        answers, seconds = measure(predictor, samples, bs, generation)
        reference = answers if reference is None else reference
        same = sum(a == r for a, r in zip(answers, reference)) / len(answers)
        rows.append((bs, len(samples), seconds, len(samples) / seconds, same))
    base = rows[0][3]
    print(
        f"{'batch size':>10} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'vs bs 1':>8} {'same answers':>13}"
    )
    for bs, n, seconds, rate, same in rows:
        print(f"{bs:>10} {n:>8} {seconds:>8.2f} {rate:>10.1f} {rate / base:>7.1f}x {same:>12.0%}")
    best = max(rows[1:], key=lambda r: r[3]) if len(rows) > 1 else rows[0]
    print(f"\nbatched (bs {best[0]}) / batch size 1 throughput: {best[3] / base:.1f}x")
    return 0 if all(r[4] == 1.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
