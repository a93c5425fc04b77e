"""Training-step throughput, peak memory and MFU of lmm vs transformers' LLaVA, side by side.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py            # tiny + larger, CPU
    python benchmarks/train_throughput.py --configs real --device cuda --dtype bf16   # GPU

Both sides train the same model (a SigLIP tower, a 2-layer GELU MLP connector, a Llama LM;
random weights, lmm's copied into ``LlavaForConditionalGeneration`` and checked to give the
same loss) on the same samples, drawn from an SFT-like length distribution (LLaVA-mix-like:
a log-normal spread of conversation lengths, a tenth of the samples text-only and longer),
in the fine-tuning stage's setting (tower frozen, connector and LM trained, AdamW).

* ``hf``: transformers' ``LlavaForConditionalGeneration(labels=...)`` on padded batches in
  sampling order (LLaVA's trainer without length grouping): full-sequence logits.
* ``lmm_padded``: lmm on the same padded batches: the LM head and the loss only at supervised
  positions, in chunks.
* ``lmm_grouped``: lmm with ``data.group_by_length`` (the same samples, batched by length).
* ``lmm_packed``: lmm with ``data.pack_length`` (each batch's samples packed into rows).

Each variant runs in its own process, so its peak memory is its own: the growth of the bytes
the C heap has allocated (glibc ``mallinfo2``, sampled every millisecond) over the timed steps,
which include gradients and AdamW state; CUDA: ``max_memory_allocated``. MFU is the
model FLOPs of the real (non-padding) work of a step, over the step time, over the FLOP/s of a
large matmul measured in the same run (CPU) or the GPU's bf16 peak (``--peak-tflops``).
Padding waste (share of computed tokens that are padding) is computed over a whole epoch of
the distribution for plain padding, length grouping and packing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

VARIANTS = ("hf", "lmm_padded", "lmm_grouped", "lmm_packed")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of the benchmarked model and of its training batches."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    llm_width: int
    llm_layers: int
    llm_heads: int
    llm_intermediate: int
    vocab_size: int
    max_length: int
    length_scale: float  # text lengths of the distribution are multiplied by this
    batch_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SHAPES = {
    # lmm's tiny default (python -m lmm tiny): 9 image tokens, 640-token vocabulary.
    "tiny": ModelShape(48, 16, 96, 3, 4, 128, 4, 4, 352, 640, 512, 0.35, 16),
    # A CPU-feasible larger model with a Llama-sized vocabulary: 64 image tokens.
    "larger": ModelShape(112, 14, 256, 4, 4, 384, 4, 6, 1024, 32000, 1024, 0.6, 8),
    # GPU only: SigLIP-so400m/384 (729 tokens) + Qwen2-0.5B shapes (as Llama blocks, 151,936 vocab).
    "real": ModelShape(384, 14, 1152, 27, 16, 896, 24, 14, 4864, 151936, 2048, 1.0, 8),
}


# -- the SFT-like length distribution -------------------------------------------------------------


def sample_lengths(n: int, shape: ModelShape, seed: int = 0) -> list[dict]:
    """``n`` samples: text length, supervised share, image or not.

    LLaVA-mix-665k-like: image conversations have a log-normal text length (median ~110 tokens,
    long tail from multi-turn VQA), answers about 40% of the text; one sample in ten is a
    text-only conversation (ShareGPT-like, median ~400 tokens). Lengths are scaled by
    ``shape.length_scale`` and capped so a sample fits ``max_length``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text_only = rng.random() < 0.1
        median, sigma = (400, 0.7) if text_only else (110, 0.8)
        text = int(np.exp(np.log(median) + sigma * rng.standard_normal()) * shape.length_scale)
        budget = shape.max_length - (0 if text_only else shape.image_tokens)
        text = int(np.clip(text, 12, budget))
        out.append(
            {
                "text": text,
                "image": not text_only,
                "answer": max(1, int(text * rng.uniform(0.25, 0.55))),
            }
        )
    return out


def sample_tensors(
    spec: dict, shape: ModelShape, image_token_id: int, vocab: int, seed: int
) -> dict:
    """One encoded sample of the given lengths (random ids; labels on the answer tokens)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, vocab, (spec["text"],), generator=g)
    image = torch.full((shape.image_tokens if spec["image"] else 0,), image_token_id)
    ids = torch.cat([text[:1], image, text[1:]])
    labels = torch.full_like(ids, -100)
    labels[-spec["answer"] :] = ids[-spec["answer"] :]
    n_images = 1 if spec["image"] else 0
    pixels = torch.randn(n_images, 3, shape.image_size, shape.image_size, generator=g)
    return {"id": str(seed), "input_ids": ids, "labels": labels, "pixel_values": pixels}


def length(spec: dict, shape: ModelShape) -> int:
    return spec["text"] + (shape.image_tokens if spec["image"] else 0)


def batch_order(
    specs: list[dict], shape: ModelShape, grouped: bool, window: int = 16
) -> list[list[int]]:
    """Sample indices per batch: sampling order, or lmm's length grouping."""
    from lmm.data.mixing import group_by_length

    n = len(specs) // shape.batch_size * shape.batch_size
    ids = np.arange(n)
    if grouped:
        lengths = np.array([length(s, shape) for s in specs])
        has_image = np.array([s["image"] for s in specs])
        ids = group_by_length(
            ids,
            lengths,
            has_image,
            shape.batch_size,
            window,
            lambda w, k: np.random.default_rng(w).permutation(k),
        )
    return ids.reshape(-1, shape.batch_size).tolist()


def padding_waste(specs: list[dict], shape: ModelShape) -> dict[str, float]:
    """Share of computed tokens that are padding, over all batches of ``specs``."""
    from lmm.data.packing import choose_rows

    out = {}
    for name, grouped, packed in (
        ("plain", False, False),
        ("grouped", True, False),
        ("packed", False, True),
    ):
        real = computed = 0
        for batch in batch_order(specs, shape, grouped):
            lens = [length(specs[i], shape) for i in batch]
            real += sum(lens)
            if packed:
                rows = choose_rows(lens, shape.max_length)
                computed += len(rows) * max(sum(lens[i] for i in r) for r in rows)
            else:
                computed += len(lens) * max(lens)
        out[name] = 1 - real / computed
    return out


# -- FLOPs ------------------------------------------------------------------------------------


def model_flops(specs: list[dict], shape: ModelShape) -> float:
    """FLOPs a fine-tuning step needs for these samples (no padding, LM head at supervised
    positions): frozen tower forward, connector and LM forward + backward (x3)."""
    d_v, d = shape.vision_width, shape.llm_width
    vision_params = shape.vision_layers * (4 * d_v * d_v + 2 * d_v * 4 * d_v)  # attention + 4x MLP
    connector_params = d_v * d + d * d
    llm_params = shape.llm_layers * (
        4 * d * d + 3 * d * shape.llm_intermediate
    )  # attention + SwiGLU
    total = 0.0
    for s in specs:
        n = length(s, shape)
        if s["image"]:
            p = shape.image_tokens
            total += 2 * vision_params * p + 4 * shape.vision_layers * p * p * d_v  # forward only
            total += 6 * connector_params * p
        total += (
            6 * llm_params * n + 3 * 2 * shape.llm_layers * n * n * d
        )  # causal attention: half of 4 n^2 d
        total += 6 * d * shape.vocab_size * s["answer"]
    return total


def matmul_flops_per_s(
    device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10
) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- models -----------------------------------------------------------------------------------


def build_models(out: Path, shape: ModelShape) -> dict[str, Path]:
    """A SigLIP tower and a Llama LM of these shapes, random weights, saved with save_pretrained
    (with a small locally trained tokenizer: the model's vocabulary rows are spare ids)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from lmm.standins.tiny import build_tiny_tokenizer
    from lmm.worlds.shapes.corpus import world_corpus

    paths = {"vision": out / "vision", "llm": out / "llm"}
    torch.manual_seed(0)
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=shape.vision_width,
            intermediate_size=4 * shape.vision_width,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            vision_use_head=False,
        )
    ).save_pretrained(paths["vision"])
    SiglipImageProcessor(
        size={"height": shape.image_size, "width": shape.image_size}
    ).save_pretrained(paths["vision"])
    tokenizer = build_tiny_tokenizer(world_corpus(), 640)
    tokenizer.save_pretrained(paths["llm"])
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=shape.llm_width,
            intermediate_size=shape.llm_intermediate,
            num_hidden_layers=shape.llm_layers,
            num_attention_heads=shape.llm_heads,
            vocab_size=max(shape.vocab_size, len(tokenizer)),
            max_position_embeddings=shape.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).save_pretrained(paths["llm"])
    return paths


def load_lmm(paths: dict[str, Path]):
    from lmm.model.freeze import FreezeConfig
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM
    from lmm.model.towers import VisionConfig

    torch.manual_seed(0)
    model = LMM(
        VisionConfig(name_or_path=str(paths["vision"]), feature_layer=-1),
        LanguageConfig(name_or_path=str(paths["llm"])),
        "mlp2x_gelu",
    )
    model.apply_freeze(FreezeConfig(vision="frozen"))  # the fine-tuning stage
    return model.train()


def hf_llava_from(lmm_model):
    """transformers' LlavaForConditionalGeneration holding lmm's weights (lmm's export mapping)."""
    from transformers import LlavaForConditionalGeneration

    from lmm.checkpoints.hf_export import llava_state_and_config

    ckpt = SimpleNamespace(
        model=lmm_model, info={"model": {"vision": {"kind": "hf"}, "connector": "mlp2x_gelu"}}
    )
    config, state = llava_state_and_config(ckpt)
    config.text_config._attn_implementation = lmm_model.llm.config._attn_implementation
    model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.vision_tower.") for k in missing):
        raise RuntimeError(
            f"weights do not map: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.model.vision_tower.requires_grad_(False)
    return model.train()


# -- one variant, in its own process ------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_bytes_fn():
    """Bytes the C heap has handed out and not taken back (glibc ``mallinfo2``: small blocks in
    use + mmapped blocks): unlike the resident set, freed memory the heap keeps is not counted.
    Falls back to the resident set where ``mallinfo2`` is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def heap() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        heap()
        return heap, "heap"
    except (OSError, AttributeError):

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()

        return rss, "rss"


class PeakMemory:
    """Peak allocated CPU memory above the level at start, sampled in a thread every 1 ms."""

    def __init__(self, every_s: float = 0.001) -> None:
        self.read, self.kind = _heap_bytes_fn()
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self.base = self.read()

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read() - self.base)
            time.sleep(self.every_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read() - self.base)


def run_variant(args) -> dict:
    from lmm.data.collate import collate
    from lmm.data.packing import pack

    shape = SHAPES[args.config]
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    paths = {"vision": Path(args.models) / "vision", "llm": Path(args.models) / "llm"}
    model = load_lmm(paths)
    image_id, pad_id = model.image_token_id, model.tokenizer.pad_token_id
    if args.variant == "hf":
        model = hf_llava_from(model)
    model = model.to(device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    steps = args.warmup + args.steps
    specs = sample_lengths(steps * shape.batch_size, shape, seed=1)
    order = batch_order(specs, shape, grouped=args.variant == "lmm_grouped")
    batches = []
    for batch in order[:steps]:
        samples = [sample_tensors(specs[i], shape, image_id, 640, seed=i) for i in batch]
        b = (
            pack(samples, pad_id, shape.max_length)
            if args.variant == "lmm_packed"
            else collate(samples, pad_id)
        )
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})

    def step(b: dict) -> float:
        pixels = b["pixel_values"].to(dtype)
        if args.variant == "hf":
            loss = model(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                pixel_values=pixels,
                labels=b["labels"],
            ).loss
        else:
            loss = model(
                b["input_ids"], b["attention_mask"], b["labels"], pixels, b.get("position_ids")
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for b in batches[: args.warmup]:
        step(b)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    with PeakMemory() as mem:
        for b in batches[args.warmup :]:
            start = time.perf_counter()
            step(b)
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else mem.peak
    measured = [specs[i] for batch in order[args.warmup : steps] for i in batch]
    computed = sum(int(b["input_ids"].numel()) for b in batches[args.warmup :])
    real = sum(length(s, shape) for s in measured)
    seconds = sum(times)
    return {
        "variant": args.variant,
        "seconds": seconds,
        "samples_per_s": len(measured) / seconds,
        "tokens_per_s": real / seconds,
        "computed_tokens": computed,
        "padding_share": 1 - real / computed,
        "peak_bytes": peak,
        "model_flops": model_flops(measured, shape),
    }


# -- the comparison -----------------------------------------------------------------------------


def parity(paths: dict[str, Path], shape: ModelShape) -> float:
    """|loss(lmm) - loss(transformers LLaVA)| on one padded batch, same weights."""
    from lmm.data.collate import collate

    model = load_lmm(paths)
    hf = hf_llava_from(model)
    specs = sample_lengths(4, shape, seed=7)
    b = collate(
        [sample_tensors(s, shape, model.image_token_id, 640, seed=i) for i, s in enumerate(specs)],
        model.tokenizer.pad_token_id,
    )
    with torch.no_grad():
        ours = model(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])
        theirs = hf(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            pixel_values=b["pixel_values"],
            labels=b["labels"],
        ).loss
    return abs(float(ours) - float(theirs))


def compare(args) -> dict:
    results = {}
    peak_flops = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else matmul_flops_per_s(
            args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        )
    )
    print(
        f"device {args.device} {args.dtype}, {args.threads} thread(s); matmul peak "
        f"{peak_flops / 1e9:.1f} GFLOP/s ({'given' if args.peak_tflops else 'measured, 2048^3'})"
    )
    for name in args.configs:
        shape = SHAPES[name]
        with tempfile.TemporaryDirectory() as tmp:
            paths = build_models(Path(tmp), shape)
            gap = parity(paths, shape)
            rows = {}
            for variant in VARIANTS:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--variant",
                    variant,
                    "--config",
                    name,
                    "--models",
                    tmp,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--threads",
                    str(args.threads),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{name}/{variant} failed:\n{out.stderr[-3000:]}")
                rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        waste = padding_waste(sample_lengths(4096, shape, seed=2), shape)
        results[name] = {
            "shape": asdict(shape),
            "loss_gap_vs_hf": gap,
            "variants": rows,
            "padding_waste": waste,
        }
        _print_table(name, shape, rows, waste, gap, peak_flops)
    return results


def _print_table(
    name: str, shape: ModelShape, rows: dict, waste: dict, gap: float, peak_flops: float
) -> None:
    hf = rows["hf"]
    print(
        f"\n== {name}: {shape.image_tokens} image tokens, LM {shape.llm_layers}x{shape.llm_width}, vocab "
        f"{shape.vocab_size}, batch {shape.batch_size}; same weights: |loss lmm - loss HF| = {gap:.2e}"
    )
    print(
        f"{'variant':<12} {'samples/s':>10} {'tokens/s':>10} {'padding':>8} {'peak MiB':>9} {'MFU':>7} "
        f"{'speed vs HF':>12} {'memory vs HF':>13}"
    )
    for variant, r in rows.items():
        mfu = r["model_flops"] / r["seconds"] / peak_flops
        print(
            f"{variant:<12} {r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} {r['padding_share']:>8.1%} "
            f"{r['peak_bytes'] / 2**20:>9.0f} {mfu:>7.1%} {r['samples_per_s'] / hf['samples_per_s']:>11.2f}x "
            f"{r['peak_bytes'] / max(hf['peak_bytes'], 1):>12.2f}x"
        )
    print(
        "padding waste over an epoch (share of computed tokens): "
        + ", ".join(f"{k} {v:.1%}" for k, v in waste.items())
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", nargs="+", default=["tiny", "larger"], choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (allocations, optimizer state)"
    )
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak FLOP/s in TFLOP/s for MFU (e.g. 989 for H100 SXM bf16 dense); "
        "default: a measured large matmul",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        print(json.dumps(run_variant(args)))
        return
    results = compare(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
