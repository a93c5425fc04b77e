"""Train a tiny LMM a few steps on fixed global batches, on 1 process or 2 (DDP or FSDP2),
and write the per-step global loss and the final weights. Run by tests/test_parallel.py.

Every rank takes its slice of the same global batches, and every sample has the same number
of supervised tokens, so the mean of the ranks' losses is the global batch's loss.
"""

from __future__ import annotations

import argparse
import json
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lmm.constants import IGNORE_INDEX
from lmm.data.collate import collate
from lmm.model.freeze import FreezeConfig
from lmm.model.language import LanguageConfig
from lmm.model.towers import VisionConfig
from lmm.train.module import LMMModule, OptimConfig
from lmm.train.nonfinite import NonFiniteGuard

GLOBAL_BATCH = 4
ANSWER = 5


def global_batches(model, steps: int, image_size: int) -> list[list[dict]]:
    """The same global batch every step (so the loss must fall)."""
    g = torch.Generator().manual_seed(0)
    n_image = model.model.num_image_tokens
    samples = []
    for k in range(GLOBAL_BATCH):
        prompt = torch.randint(10, 400, (3 + k,), generator=g)
        answer = torch.randint(10, 400, (ANSWER,), generator=g)
        ids = torch.cat(
            [torch.tensor([1]), torch.full((n_image,), model.model.image_token_id), prompt, answer]
        )
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-ANSWER:] = answer
        samples.append(
            {
                "id": f"{k}",
                "input_ids": ids,
                "labels": labels,
                "pixel_values": torch.randn(1, 3, image_size, image_size, generator=g),
            }
        )
    return [samples] * steps


class RankSlices(Dataset):
    def __init__(self, batches, rank: int, world: int) -> None:
        per = GLOBAL_BATCH // world
        self.items = [collate(b[rank * per : (rank + 1) * per], pad_id=0) for b in batches]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class GlobalLoss(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.sharded = False

    def on_train_start(self, trainer, pl_module) -> None:
        from lmm.train.parallel import is_sharded

        self.sharded = is_sharded(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= trainer.world_size
        self.losses.append(float(loss))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vision", required=True)
    ap.add_argument("--llm", required=True)
    ap.add_argument("--image-size", type=int, required=True)
    ap.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = LMMModule(
        vision=VisionConfig(name_or_path=args.vision, feature_layer=-1),
        llm=LanguageConfig(name_or_path=args.llm),
        freeze=FreezeConfig(vision="full", connector="full", llm="full"),
        optim=OptimConfig(lr_vision=1e-3, lr_connector=1e-3, lr_llm=1e-3, warmup_ratio=0.0),
        save_weights=os.path.join(args.out, "weights.safetensors"),
    )
    if args.strategy == "single":
        strategy, devices = "auto", 1
    elif args.strategy == "ddp":
        strategy, devices = "ddp", 2
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy, devices = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2
    losses = GlobalLoss()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[losses, NonFiniteGuard()],
    )  # as `python -m lmm fit` always adds
    data = RankSlices(
        global_batches(module, args.steps, args.image_size), trainer.global_rank, trainer.world_size
    )
    trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False))
    if trainer.is_global_zero:
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump({"losses": losses.losses, "sharded": losses.sharded}, f)


if __name__ == "__main__":
    main()
