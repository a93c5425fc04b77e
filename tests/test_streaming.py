"""Training stream: the epoch plan (ranks, workers, mixing, length grouping), exact resume
with and without a Trainer, text-only samples, and skip accounting.

Shard sets are fabricated in tmp_path (tiny PNGs, short conversations) with an lmm manifest,
as the data_prep converters write them.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import TOKENS_PER_IMAGE, json_bytes, png_bytes
from torch.utils.data import DataLoader

from lmm.data.collate import collate
from lmm.data.datamodule import LMMDataModule
from lmm.data.encode import Processor
from lmm.data.manifest import FORMAT, VERSION, estimate_tokens, write_manifest
from lmm.data.mixing import MixIndex, ShardSet
from lmm.data.shards import PlannedStream

N = TOKENS_PER_IMAGE


def write_set(
    root: Path,
    name: str,
    counts: list[int],
    *,
    text_only_every: int = 0,
    manifest: bool = True,
    corrupt: tuple[str, ...] = (),
) -> str:
    """Shards ``root/name/shard-K.tar`` with ``counts[K]`` samples keyed ``{name}-{i:04d}``.

    Sample i has i % 5 + 1 question/answer words pairs (so lengths vary); every
    ``text_only_every``-th sample has no image. Keys in ``corrupt`` get undecodable image bytes.
    Returns the shard pattern.
    """
    folder = root / name
    folder.mkdir(parents=True)
    entries, i = [], 0
    for k, count in enumerate(counts):
        tokens, images = [], []
        with wds.TarWriter(str(folder / f"shard-{k:06d}.tar"), encoder=False) as sink:
            for _ in range(count):
                key = f"{name}-{i:04d}"
                text_only = text_only_every and i % text_only_every == 0
                words = " ".join(["red"] * (1 + (i * 7) % 23))
                conv = [
                    {"from": "human", "value": ("" if text_only else "<image>\n") + "What colour?"},
                    {"from": "gpt", "value": words},
                ]
                sample = {"__key__": key, "json": json_bytes({"id": key, "conversations": conv})}
                if not text_only:
                    sample["png"] = (
                        b"\x89PNG broken" if key in corrupt else png_bytes((i * 37 % 255, 40, 90))
                    )
                sink.write(sample)
                tokens.append(estimate_tokens(f"What colour?\n{words}"))
                images.append(0 if text_only else 1)
                i += 1
        entries.append(
            {"path": f"shard-{k:06d}.tar", "num_samples": count, "tokens": tokens, "images": images}
        )
    if manifest:
        write_manifest(
            folder,
            {"format": FORMAT, "version": VERSION, "num_samples": sum(counts), "shards": entries},
        )
    return str(folder / "shard-*.tar")


def key_of(raw: dict) -> dict:
    return {"id": raw["__key__"]}


def ids_of(samples: list[dict]) -> dict:
    return {"ids": [s["id"] for s in samples], "size": len(samples)}


def stream_ids(
    index: MixIndex,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    num_workers: int = 0,
    **kw,
) -> list[list[str]]:
    stream = PlannedStream(
        index, key_of, ids_of, batch_size, rank=rank, world_size=world_size, **kw
    )
    stream.epoch = epoch
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    out = []
    for b in loader:
        assert b["position"] == {"epoch": epoch, "index": len(out)}
        out.append(b["ids"])
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return write_set(tmp_path_factory.mktemp("uneven"), "u", [7, 16, 3, 11, 9])  # 46 samples


@pytest.fixture(scope="module")
def processor(lmm_model) -> Processor:
    m = lmm_model
    return Processor(m.tokenizer, m.vision.image_spec, m.num_image_tokens, m.image_token_id)


# -- ranks and workers ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_get_disjoint_samples_and_equal_batch_counts(uneven, world_size):
    index = MixIndex([ShardSet(uneven)])
    per_rank = [
        stream_ids(index, batch_size=4, rank=r, world_size=world_size, seed=5)
        for r in range(world_size)
    ]
    expected_batches = (46 // world_size) // 4
    assert [len(b) for b in per_rank] == [
        expected_batches
    ] * world_size  # no rank waits at epoch end
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    ids = [k for batches in per_rank for batch in batches for k in batch]
    assert len(ids) == len(set(ids)) == world_size * expected_batches * 4  # disjoint
    assert set(ids) <= {f"u-{i:04d}" for i in range(46)}


def test_worker_count_does_not_change_the_batches(uneven):
    index = MixIndex([ShardSet(uneven)])
    single = stream_ids(index, batch_size=3, rank=1, world_size=2, seed=1)
    assert stream_ids(index, batch_size=3, rank=1, world_size=2, seed=1, num_workers=2) == single
    assert stream_ids(index, batch_size=3, rank=1, world_size=2, seed=1, num_workers=3) == single


def test_order_depends_on_seed_and_epoch_and_shuffle_can_be_off(uneven, tmp_path):
    index = MixIndex([ShardSet(uneven)])
    e0 = stream_ids(index, batch_size=5, seed=0)
    flat = [k for b in e0 for k in b]
    assert stream_ids(index, batch_size=5, seed=0) == e0
    assert stream_ids(index, batch_size=5, seed=0, epoch=1) != e0
    assert stream_ids(index, batch_size=5, seed=1) != e0
    assert flat != sorted(flat)
    # Samples of a shard are permuted within the shard, not just shards reordered.
    first_shard = [k for k in flat if int(k[2:]) < 7]
    assert first_shard != sorted(first_shard)
    ordered = [k for b in stream_ids(index, batch_size=5, shuffle=False) for k in b]
    assert ordered == [f"u-{i:04d}" for i in range(45)]
    # The same counts without a manifest (read from the tar headers) give the same plan.
    plain = write_set(tmp_path, "u", [7, 16, 3, 11, 9], manifest=False)
    assert stream_ids(MixIndex([ShardSet(plain)]), batch_size=5, seed=0) == e0


# -- mixing ------------------------------------------------------------------------------------------


def test_weights_repeat_and_subsample_sets(tmp_path):
    a = write_set(tmp_path, "a", [5, 5, 5, 5])
    b = write_set(tmp_path, "b", [6, 6, 6, 6, 6])
    index = MixIndex([ShardSet(a, weight=2.0), ShardSet(b, weight=0.5, name="half")])
    assert index.epoch_size() == 2 * 20 + 15
    epochs = []
    for epoch in range(2):
        seq = [k for batch in stream_ids(index, batch_size=5, epoch=epoch) for k in batch]
        assert len(seq) == 55
        count = Counter(seq)
        assert {k: v for k, v in count.items() if k.startswith("a")} == {
            f"a-{i:04d}": 2 for i in range(20)
        }
        b_ids = {k for k in count if k.startswith("b")}
        assert len(b_ids) == 15 and all(count[k] == 1 for k in b_ids)
        # The sets interleave (shard units are shuffled together), not one after the other.
        assert (
            sum(x[0] != y[0] for x, y in zip(seq, seq[1:])) >= 3
        )  # one switch = all of a, then all of b
        epochs.append(b_ids)
    assert epochs[0] != epochs[1]  # a fresh half of b each epoch


def test_config_accepts_patterns_and_weighted_sets(uneven, tmp_path):
    from jsonargparse import ArgumentParser

    other = write_set(tmp_path, "o", [5])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LMMDataModule, "data", skip={"processor"})
    cfg = parser.parse_args(
        ["--data.train", f"[{uneven}, {{shards: {other}, weight: 2.5, name: extra}}]"]
    )
    dm = parser.instantiate_classes(cfg).data
    assert [(s.patterns, s.weight, s.name) for s in dm.train_sets] == [
        ([uneven], 1.0, None),
        ([other], 2.5, "extra"),
    ]
    help_text = " ".join(parser.format_help().split())
    assert (
        "--data.group_by_length" in help_text
        and "Batch samples of similar length together" in help_text
    )
    assert "weighted sets ``{shards: pattern(s), weight: 2.0, name: ...}``" in help_text
    # Plain Python: dicts work too, and mistakes name the option.
    assert LMMDataModule(train=[{"shards": other, "weight": 0.5}]).train_sets[0].weight == 0.5
    with pytest.raises(ValueError, match=r"data.train\[0\]: expected \{shards, weight\?, name\?\}"):
        LMMDataModule(train=[{"shard": other}])
    with pytest.raises(ValueError, match=r"data.train\[0\].weight must be >= 0"):
        LMMDataModule(train=[ShardSet(other, weight=-1)])


# -- length grouping ------------------------------------------------------------------------------------


def test_length_grouping_keeps_modalities_apart_and_lengths_close(tmp_path):
    pattern = write_set(tmp_path, "g", [40, 40, 40], text_only_every=3)
    index = MixIndex([ShardSet(pattern)], need_tokens=True)
    lengths = dict(zip([f"g-{i:04d}" for i in range(120)], index.lengths(N).tolist()))
    has_image = dict(zip([f"g-{i:04d}" for i in range(120)], (index.images > 0).tolist()))
    kw = dict(batch_size=6, seed=2, image_tokens=N)
    plain = stream_ids(index, **kw)
    grouped = stream_ids(index, group_window=5, **kw)
    assert sorted(k for b in grouped for k in b) == sorted(
        k for b in plain for k in b
    )  # same samples
    mixed = [b for b in grouped if len({has_image[k] for k in b}) > 1]
    assert len(mixed) <= -(-len(grouped) // 5)  # at most one boundary batch per window
    assert len([b for b in plain if len({has_image[k] for k in b}) > 1]) > len(mixed)

    def spread(batches):
        return np.mean([max(lengths[k] for k in b) - min(lengths[k] for k in b) for b in batches])

    assert spread(grouped) < 0.5 * spread(plain)
    assert stream_ids(index, group_window=5, **kw) == grouped  # still deterministic
    with pytest.raises(ValueError, match="token counts"):
        MixIndex([ShardSet(pattern)]).rank_plan(
            0, 0, rank=0, world_size=1, batch_size=6, group_window=5
        )


# -- skips and failures ------------------------------------------------------------------------------------


def test_skips_are_counted_and_batch_counts_stay_equal(tmp_path, processor):
    from lmm.data.encode import SampleEncoder
    from lmm.data.templates import get_template

    pattern = write_set(tmp_path, "s", [8, 8, 8], corrupt=("s-0003",))
    index = MixIndex([ShardSet(pattern)])
    shard1 = tmp_path / "s" / "shard-000001.tar"
    shard1.write_bytes(
        shard1.read_bytes()[: shard1.stat().st_size // 2]
    )  # truncated after indexing
    (tmp_path / "s" / "shard-000002.tar").unlink()  # vanished after indexing
    enc = SampleEncoder(processor, get_template("vicuna"), max_length=256)
    total, ids = Counter(), []
    for rank in range(2):
        stream = PlannedStream(
            index, enc.train_sample, partial(collate, pad_id=0), 4, rank=rank, world_size=2
        )
        batches = list(stream)
        assert len(batches) == 3  # (24 // 2) // 4 on both ranks, whatever could not be read
        skipped = sum((Counter(b["skipped"]) for b in batches), Counter())
        assert (
            sum(b["size"] for b in batches) + sum(skipped.values()) == 12
        )  # every position accounted for
        for b in batches:
            ids += b["ids"]
            if b["size"]:
                assert (
                    b["pixel_values"].shape[0]
                    == int((b["input_ids"] == processor.image_token_id).sum()) // N
                )
        total += skipped
    assert total["image_decode"] == 1 and "s-0003" not in ids
    assert total["shard_read"] >= 8 + 1 and set(total) == {"image_decode", "shard_read"}
    assert {f"s-{i:04d}" for i in range(8)} - {"s-0003"} <= set(ids)  # the intact shard is complete
    assert not any(k >= "s-0016" for k in ids)


def test_too_few_samples_for_one_batch_per_rank_is_an_error(tmp_path):
    index = MixIndex([ShardSet(write_set(tmp_path, "t", [5]))])
    with pytest.raises(ValueError, match="cannot give each of 2 rank"):
        PlannedStream(index, key_of, ids_of, 4, world_size=2)
    with pytest.raises(ValueError, match="not a local file"):
        MixIndex([ShardSet("https://example.com/shard-000000.tar")])


# -- text-only samples ------------------------------------------------------------------------------------


def test_text_only_samples_train_without_a_dummy_image(tmp_path, processor, fresh_lmm):
    pattern = write_set(tmp_path, "m", [12], text_only_every=2)
    dm = LMMDataModule(
        train=[pattern],
        template="vicuna",
        batch_size=4,
        num_workers=0,
        max_length=256,
        shuffle_buffer=0,
        processor=processor,
    )
    batches = list(dm.train_dataloader())
    assert [b["ids"] for b in batches] == [
        [f"m-{i:04d}" for i in range(j, j + 4)] for j in (0, 4, 8)
    ]
    model = fresh_lmm.train()
    for b in batches:
        n_img = int((b["input_ids"] == processor.image_token_id).sum())
        assert (
            n_img == 2 * N and b["pixel_values"].shape[0] == 2
        )  # two of four samples have an image
        loss = model(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])
        assert torch.isfinite(loss)
    # A batch of text-only samples: no pixels at all, and the image path still gets (zero)
    # gradients, so DDP finds every trainable parameter used on every rank.
    text = LMMDataModule(
        train=[write_set(tmp_path, "t", [4], text_only_every=1)],
        template="vicuna",
        batch_size=4,
        num_workers=0,
        max_length=256,
        processor=processor,
    )
    (b,) = list(text.train_dataloader())
    assert b["pixel_values"].shape == (0, 3, 32, 32)
    model.zero_grad(set_to_none=True)
    model(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"]).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.connector.parameters())
    assert all(p.grad is not None for p in model.vision.parameters() if p.requires_grad)
    assert any(p.grad is not None and p.grad.any() for p in model.llm.parameters())


# -- exact resume -----------------------------------------------------------------------------------------


def make_dm(pattern, processor, **kw) -> LMMDataModule:
    args = dict(
        train=[pattern],
        template="vicuna",
        batch_size=4,
        num_workers=0,
        max_length=256,
        seed=3,
        processor=processor,
    )
    return LMMDataModule(**(args | kw))


def test_resume_without_trainer_continues_exactly(tmp_path, processor):
    pattern = write_set(
        tmp_path, "r", [9, 13, 6], text_only_every=4
    )  # 28 samples -> 7 batches of 4
    full_loader = make_dm(pattern, processor).train_dataloader()
    full = [b["ids"] for _ in range(2) for b in full_loader]  # two epochs
    assert len(full) == 14

    for stop in (3, 7, 10):  # mid epoch 0, at its end, mid epoch 1
        dm = make_dm(pattern, processor)
        loader = dm.train_dataloader()
        seen: list[list[str]] = []
        while len(seen) < stop:
            for b in loader:
                seen.append(b["ids"])
                if len(seen) == stop:
                    break
        state = json.loads(json.dumps(dm.state_dict()))  # plain data, as in a checkpoint
        expected = (
            divmod(stop, 7) if stop % 7 else (stop // 7 - 1, 7)
        )  # the end of an epoch is (e, 7)
        assert (state["epoch"], state["batches"]) == expected

        resumed = make_dm(pattern, processor, num_workers=2)  # other worker count: same batches
        resumed.load_state_dict(state)
        rl = resumed.train_dataloader()
        rest = [b["ids"] for b in rl]
        if len(seen) + len(rest) < 14:
            rest += [b["ids"] for b in rl]
        assert seen + rest == full, stop


def test_resume_with_another_plan_is_refused_or_restarts_the_epoch(tmp_path, processor):
    pattern = write_set(tmp_path, "p", [16])
    dm = make_dm(pattern, processor)
    it = iter(dm.train_dataloader())
    next(it), next(it)
    state = dm.state_dict()
    other = make_dm(pattern, processor, batch_size=2)
    other.load_state_dict(state)
    with pytest.raises(
        ValueError, match=r"batch_size: checkpoint 4 vs now 2.*data.strict_resume=false"
    ):
        other.train_dataloader()
    lenient = make_dm(pattern, processor, batch_size=2, strict_resume=False)
    lenient.load_state_dict(state)
    assert len(list(lenient.train_dataloader())) == 8  # epoch 0 again from its first batch


class RecordIds:
    """Records the sample ids of every training batch (a Lightning callback)."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []
        self.skipped: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append(list(batch["ids"]))
        self.skipped.append(dict(batch["skipped"]))


def test_lightning_fit_resumed_from_a_checkpoint_repeats_the_batches_and_the_weights(
    tmp_path, tiny_models
):
    """Train 12 steps straight; train, stop at a checkpoint, resume to 12: the same batches and,
    bit for bit, the same weights. The LM trains LoRA adapters with dropout 0.05, so this also
    needs the random state restored (Lightning does not checkpoint it; LMMModule does) and data
    loaders that do not draw from the global RNG."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lmm.model.freeze import FreezeConfig
    from lmm.model.language import LanguageConfig
    from lmm.model.towers import VisionConfig
    from lmm.train.module import LMMModule

    # 32 samples -> 8 batches of 4; one image is corrupt (skipped, counted, the batch is one short).
    pattern = write_set(tmp_path, "f", [10, 14, 8], text_only_every=5, corrupt=("f-0004",))

    class Recorder(RecordIds, Callback):
        weights: dict[str, torch.Tensor]

    def fit(max_steps: int, num_workers: int, ckpt_path=None, checkpoints=None) -> Recorder:
        torch.manual_seed(0)
        module = LMMModule(
            vision=VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
            llm=LanguageConfig(name_or_path=str(tiny_models["llm"])),
            freeze=FreezeConfig(llm="lora"),
        )
        dm = make_dm(pattern, module.processor, num_workers=num_workers)
        rec = Recorder()
        callbacks = [rec] + ([checkpoints] if checkpoints else [])
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=checkpoints is not None,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        assert trainer.global_step == max_steps
        # The module's skip counter (what it logs as skipped/<reason>) adds up the batches' counts.
        assert module.skipped == sum((Counter(s) for s in rec.skipped), Counter())
        rec.weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return rec

    def same_weights(a: dict, b: dict) -> bool:
        assert a.keys() == b.keys()
        return all(torch.equal(a[k], b[k]) for k in a)

    ckpts = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    run = fit(12, num_workers=0, checkpoints=ckpts)
    full = run.ids
    assert (
        len(full) == 12 and len({k for b in full[:8] for k in b}) == 31
    )  # epoch 0 saw every usable sample once
    assert sum((Counter(s) for s in run.skipped[:8]), Counter()) == {"image_decode": 1}
    assert sum(len(b) for b in full[:8]) == 31 and "f-0004" not in {k for b in full for k in b}
    assert full[8:] != full[:4]  # epoch 1 is a new order

    saved = torch.load(tmp_path / "ckpt" / "step=6.ckpt", weights_only=True)  # plain data only
    assert {k: saved["LMMDataModule"][k] for k in ("epoch", "batches")} == {
        "epoch": 0,
        "batches": 6,
    }
    assert len(saved["rng_states"]) == 1  # one per rank
    assert not same_weights(
        {k: saved["state_dict"][k] for k in run.weights}, run.weights
    )  # steps 7-12 trained
    # Mid epoch 0, the end of epoch 0 (the next step opens a new loader iterator), mid epoch 1;
    # the worker count differs from the straight run's: it does not change a batch.
    for step, workers in ((6, 2), (8, 1), (10, 0)):
        resumed = fit(12, num_workers=workers, ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed.ids == full[step:], step
        assert same_weights(resumed.weights, run.weights), step
    # Control: without the saved random state the same batches give other weights (the dropout
    # masks differ), so the test above does depend on dropout and on restoring that state.
    del saved["rng_states"]
    torch.save(saved, tmp_path / "no_rng.ckpt")
    control = fit(12, num_workers=0, ckpt_path=tmp_path / "no_rng.ckpt")
    assert control.ids == full[6:] and not same_weights(control.weights, run.weights)


# -- the tar index -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_tar_index_reads_every_dialect_like_tarfile(tmp_path, fmt):
    import io
    import tarfile

    from lmm.data.tarindex import TarSamples

    long_dir = "d" * 120  # > 100 chars: ustar prefix field, GNU long name, PAX path record
    names = {
        f"{long_dir}/s0": {"json": b'{"a": 1}', "000.png": png_bytes()},
        "s1": {"json": b"{}", "png": b"x" * 1500},
        "sé2": {"json": b"[]"},
    }  # non-ASCII key
    path = tmp_path / f"{fmt}.tar"
    with tarfile.open(path, "w", format=getattr(tarfile, fmt), encoding="utf-8") as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for key, members in names.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    idx = TarSamples(str(path))
    assert idx.error is None and idx.keys == list(names)
    for i, (key, members) in enumerate(names.items()):
        raw = idx.read(i)
        assert (
            raw["__key__"] == key
            and {k: v for k, v in raw.items() if not k.startswith("__")} == members
        )
    # Cut inside the last sample's data: the complete samples stay, the cut one is reported.
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"x" * 1500) + 700])
    idx = TarSamples(str(cut))
    assert idx.keys == [f"{long_dir}/s0"] and "cut off" in idx.error
    # Cut at a block boundary, just before a header (as a buffered copy stops): no tar reader
    # fails there, but the end-of-archive blocks are missing, so the last sample is not trusted.
    cut.write_bytes(data[: data.index(b"x" * 1500) + 1536])
    idx = TarSamples(str(cut))
    assert idx.keys == [f"{long_dir}/s0"] and "end-of-archive" in idx.error
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    idx = TarSamples(str(garbage))
    assert len(idx) == 0 and idx.error
    # A damaged header (checksum no longer matches) in the middle: the fast scanner hands over
    # to tarfile, which stops there; the samples before it stay readable.
    damaged = bytearray(data)
    at = data.index(b"s1.json")  # the name field of sample s1's first member header
    damaged[at] = ord("t")
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    idx = TarSamples(str(tmp_path / "damaged.tar"))
    assert idx.keys == [f"{long_dir}/s0"] and idx.read(0)["000.png"] == png_bytes()
