"""Where the tiny finetune step's time goes, and what the usual speed-ups do to it.

Builds the tiny finetune stage from ``configs/tiny/finetune.yaml`` (needs ``artifacts/tiny``:
run ``python -m lmm tiny`` once, or at least its prepare and pretrain stages), then:

1. times the data side (one batch from the training loader, in this process) and the model's
   forward, backward and AdamW step, as medians over the same batches;
2. for each variant, trains two copies of the same model on the same batches with their steps
   interleaved (so a busy machine slows both alike) and prints the median step times and their
   ratio:

   - ``compile``: ``torch.compile`` per block (``model.efficiency.compile``), dynamic shapes;
     the compile time is printed separately;
   - ``eager_attention``: transformers' eager attention instead of SDPA, LM and tower;
   - ``prefetch_thread``: the next batch prepared in a Python thread while the step runs;
   - ``fused_adamw``: ``torch.optim.AdamW(fused=True)``.

Nothing here changes the recipe; it measures whether a speed-up pays on this machine.

    OMP_NUM_THREADS=2 python benchmarks/tiny_step.py --steps 40
"""

from __future__ import annotations

import argparse
import copy
import queue
import statistics
import threading
import time
import warnings

import torch

from lmm.model.efficiency import compile_blocks
from lmm.model.language import decoder_blocks
from lmm.train.cli import LMMCLI

VARIANTS = ("compile", "eager_attention", "prefetch_thread", "fused_adamw")


def build(extra: list[str]):
    # This script's own flags are in sys.argv; the CLI gets its args explicitly.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    cli = LMMCLI(
        args=["--config", "configs/tiny/finetune.yaml", "--trainer.logger", "false", *extra],
        run=False,
    )
    cli.datamodule.setup("fit")
    return cli.model.model, cli.datamodule


def adamw(model, fused: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=fused or None)


def step(model, opt, batch) -> list[float]:
    """Forward, backward and optimizer step of one batch; the three durations."""
    t = [time.perf_counter()]
    loss = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        batch["pixel_values"],
        batch.get("position_ids"),
    )
    t.append(time.perf_counter())
    loss.backward()
    t.append(time.perf_counter())
    opt.step()
    opt.zero_grad(set_to_none=True)
    t.append(time.perf_counter())
    return [b - a for a, b in zip(t, t[1:])]


def breakdown(model, dm, n: int) -> None:
    it = iter(dm.train_dataloader())
    data, batches = [], []
    for _ in range(n):
        t = time.perf_counter()
        batches.append(next(it))
        data.append(time.perf_counter() - t)
    opt = adamw(model)
    for b in batches[:3]:
        step(model, opt, b)
    parts = [step(model, opt, b) for b in batches[3:]]
    ms = {
        "data": statistics.median(data),
        **{k: statistics.median(p[i] for p in parts) for i, k in enumerate(("fwd", "bwd", "opt"))},
    }
    total = sum(ms.values())
    print("step breakdown (median ms, share):")
    for k, v in ms.items():
        print(f"  {k:<5}{v * 1e3:8.1f}  {v / total:6.1%}")
    print(f"  total{total * 1e3:8.1f}")


def variant(name: str, model, dm, n: int) -> None:
    base, other = model, copy.deepcopy(model)
    opts = {"base": adamw(base), name: adamw(other, fused=name == "fused_adamw")}
    models = {"base": base, name: other}
    if name == "compile":
        t = time.perf_counter()
        compile_blocks([*other.vision.blocks(), *decoder_blocks(other.llm)], "inductor", True)
    if name == "eager_attention":
        other.llm.config._attn_implementation = "eager"
        other.vision.model.config._attn_implementation = "eager"
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(n)]
    if name == "compile":
        for b in batches[:4]:
            step(other, opts[name], b)
        print(f"  compile + 4 steps: {time.perf_counter() - t:.1f} s")
    for b in batches[:3]:
        for k in models:
            step(models[k], opts[k], b)
    times: dict[str, list[float]] = {k: [] for k in models}
    if name == "prefetch_thread":  # the same steps, with batches from the loader vs a thread
        for k in models:
            feed = _threaded(dm, n) if k == name else iter(dm.train_dataloader())
            for _ in range(n):
                t = time.perf_counter()
                step(models[k], opts[k], next(feed))
                times[k].append(time.perf_counter() - t)
    else:
        for b in batches[3:]:
            for k in models:
                times[k].append(sum(step(models[k], opts[k], b)))
    base_ms, var_ms = (statistics.median(times[k]) * 1e3 for k in ("base", name))
    print(
        f"  {name}: base {base_ms:.1f} ms/step, variant {var_ms:.1f} ms/step, "
        f"speed-up {base_ms / var_ms:.3f}x"
    )


def _threaded(dm, n: int):
    q: queue.Queue = queue.Queue(maxsize=2)
    it = iter(dm.train_dataloader())
    threading.Thread(target=lambda: [q.put(next(it)) for _ in range(n)], daemon=True).start()
    while True:
        yield q.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    model, dm = build([])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    breakdown(model, dm, args.steps)
    print("variants (interleaved with an identical baseline copy):")
    for name in args.variants:
        variant(name, model, dm, args.steps)


if __name__ == "__main__":
    main()
