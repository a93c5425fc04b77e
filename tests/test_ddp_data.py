"""Two real DDP processes (CPU, gloo) training on the DataModule: each epoch is split between
the ranks exactly as the epoch plan says.

Lightning's ``ddp`` strategy with ``start_method="fork"`` starts two worker processes from
this one (nothing to import again, so it takes seconds); each builds its training loader
from the Trainer's rank and world size, trains two epochs with the tiny models and writes
the sample ids of its batches to a file; checkpoints are written on the way. Collectives
time out after a minute, so a rank that got an extra batch fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import socket
from datetime import timedelta

import torch

from lmm.data.mixing import MixIndex, ShardSet
from lmm.data.tarindex import TarSamples

WORLD_SIZE = 2
BATCH_SIZE = 5
EPOCHS = 2
SEED = 11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_ranks_split_every_epoch_into_disjoint_equal_halves(
    tmp_path, tiny_world, tiny_models, monkeypatch
):
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy

    from lmm.data.datamodule import LMMDataModule
    from lmm.model.language import LanguageConfig
    from lmm.model.towers import VisionConfig
    from lmm.train.module import LMMModule

    world_dir, _ = tiny_world
    pattern = str(world_dir / "pretrain" / "shard-*.tar")  # 4 shards x 16 samples
    out = tmp_path / "ranks"
    out.mkdir()

    class RecordRank(Callback):
        """In each rank: the ids of every training batch, and where the rank came from."""

        def __init__(self) -> None:
            self.batches: list[dict] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batches.append(
                {
                    "epoch": trainer.current_epoch,
                    "ids": list(batch["ids"]),
                    "position": batch["position"],
                    "skipped": batch["skipped"],
                }
            )

        def on_train_end(self, trainer, pl_module) -> None:
            dist = torch.distributed
            rank = dist.get_rank()
            record = {
                "rank": rank,
                "world_size": dist.get_world_size(),
                "backend": dist.get_backend(),
                "trainer_rank": trainer.global_rank,
                "batches": self.batches,
            }
            (out / f"rank{rank}.json").write_text(json.dumps(record))

    # Lightning sets these for the processes it starts; monkeypatch puts the old values back.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.manual_seed(0)
    module = LMMModule(
        vision=VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        llm=LanguageConfig(name_or_path=str(tiny_models["llm"])),
    )
    dm = LMMDataModule(
        train=[pattern],
        template="plain",
        batch_size=BATCH_SIZE,
        num_workers=1,
        max_length=256,
        seed=SEED,
        processor=module.processor,
    )
    # A checkpoint at step 8 (epoch 1, batch 2): saving gathers every rank's random state.
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=8, save_top_k=-1
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        max_epochs=EPOCHS,
        logger=False,
        strategy=DDPStrategy(
            process_group_backend="gloo", start_method="fork", timeout=timedelta(seconds=60)
        ),
        callbacks=[RecordRank(), ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)

    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for r, rec in enumerate(records):
        assert (rec["rank"], rec["world_size"], rec["backend"], rec["trainer_rank"]) == (
            r,
            WORLD_SIZE,
            "gloo",
            r,
        )

    # What the epoch should hold: the shards' samples in the plan's order, of which the last
    # len % (world_size x batch_size) are dropped for this epoch (fewer than world_size x batch_size).
    index = MixIndex([ShardSet(pattern)])
    ids = []
    for url in index.urls:
        tar = TarSamples(url)
        ids += [json.loads(tar.read(i)["json"])["id"] for i in range(len(tar))]
        tar.close()
    assert len(ids) == len(set(ids)) == 64
    per_rank = index.batches_per_rank(BATCH_SIZE, WORLD_SIZE)
    used = WORLD_SIZE * per_rank * BATCH_SIZE
    assert (per_rank, used) == (6, 60) and 0 < len(ids) - used < WORLD_SIZE * BATCH_SIZE

    epochs_seen = []
    for epoch in range(EPOCHS):
        batches = [[b for b in rec["batches"] if b["epoch"] == epoch] for rec in records]
        # Both ranks get the same number of full batches, in plan order.
        assert [len(b) for b in batches] == [per_rank] * WORLD_SIZE
        assert all(
            len(b["ids"]) == BATCH_SIZE and b["skipped"] == {} for rank in batches for b in rank
        )
        assert [[b["position"] for b in rank] for rank in batches] == [
            [{"epoch": epoch, "index": j} for j in range(per_rank)]
        ] * WORLD_SIZE
        rank_ids = [[i for b in rank for i in b["ids"]] for rank in batches]
        # Disjoint, and together exactly the epoch's sequence less its short tail.
        assert not set(rank_ids[0]) & set(rank_ids[1])
        sequence = index.epoch_sequence(epoch, SEED)
        expected = {ids[g] for g in sequence[:used]}
        assert set(rank_ids[0]) | set(rank_ids[1]) == expected
        assert len(rank_ids[0]) + len(rank_ids[1]) == used
        assert set(ids) - expected == {ids[g] for g in sequence[used:]}
        # Each rank's batches are its rows of the plan, read with its own rank and world size.
        for r in range(WORLD_SIZE):
            plan = index.rank_plan(
                epoch, SEED, rank=r, world_size=WORLD_SIZE, batch_size=BATCH_SIZE
            )
            assert [b["ids"] for b in batches[r]] == [
                [ids[g] for g in row] for row in plan.tolist()
            ]
        epochs_seen.append(rank_ids)
    assert epochs_seen[0] != epochs_seen[1]  # a new order (and a new dropped tail) each epoch

    saved = torch.load(tmp_path / "ckpt" / "step=8.ckpt", weights_only=True)  # 6 batches per epoch
    assert len(saved["rng_states"]) == WORLD_SIZE
    assert {k: saved["LMMDataModule"][k] for k in ("epoch", "batches")} == {
        "epoch": 1,
        "batches": 2,
    }
    assert saved["LMMDataModule"]["plan"]["world_size"] == WORLD_SIZE
