"""Shard streams: DataModule round trip, node/worker splitting, skip accounting, epoch order."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import webdataset as wds
from conftest import TOKENS_PER_IMAGE, json_bytes, png_bytes
from torch.utils.data import DataLoader

from lmm.data.collate import collate
from lmm.data.datamodule import LMMDataModule
from lmm.data.encode import IGNORE_INDEX, Processor, SampleEncoder
from lmm.data.shards import EpochLoader, ShardStream, expand_shards, shard_slice
from lmm.data.templates import get_template

N = TOKENS_PER_IMAGE


def read_tar(path: Path) -> dict[str, dict]:
    """Samples of a shard read with the standard library: key -> {ext: bytes}."""
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def split_shards(world: tuple[Path, dict], split: str) -> list[str]:
    root, manifest = world
    return [str(root / s) for s in manifest["splits"][split]["shards"]]


@pytest.fixture(scope="module")
def processor(lmm_model) -> Processor:
    m = lmm_model
    return Processor(m.tokenizer, m.vision.image_spec, m.num_image_tokens, m.image_token_id)


# Module-level (picklable) stand-ins for the encoder and collate: only ids matter here.
def key_of(raw: dict) -> dict:
    return {"id": raw["__key__"]}


def ids_of(samples: list[dict]) -> dict:
    return {"ids": [s["id"] for s in samples], "size": len(samples)}


# -- DataModule round trip -------------------------------------------------------------------


def test_datamodule_round_trip(tiny_world, processor, tokenizer):
    root, manifest = tiny_world
    shards = split_shards(tiny_world, "finetune")
    dm = LMMDataModule(
        train=[str(root / "finetune" / "shard-*.tar")],
        template="vicuna",
        batch_size=4,
        num_workers=0,
        max_length=256,
        processor=processor,
    )
    truth = {k: json.loads(v["json"]) for s in shards for k, v in read_tar(Path(s)).items()}
    assert len(truth) == manifest["splits"]["finetune"]["num_samples"] == 64

    seen: list[str] = []
    for batch in dm.train_dataloader():
        B, T = batch["input_ids"].shape
        assert batch["size"] == B == len(batch["ids"]) <= 4
        assert batch["skipped"] == {}
        assert batch["labels"].shape == batch["attention_mask"].shape == (B, T)
        # Right padding: the mask is a prefix of ones; padded positions hold pad ids and no label.
        lengths = batch["attention_mask"].sum(1)
        for row in range(B):
            L = int(lengths[row])
            assert (
                batch["attention_mask"][row, :L].all()
                and not batch["attention_mask"][row, L:].any()
            )
            assert (batch["input_ids"][row, L:] == tokenizer.pad_token_id).all()
            assert (batch["labels"][row, L:] == IGNORE_INDEX).all()
        # One image per sample, N ids per image.
        n_image_ids = int((batch["input_ids"] == processor.image_token_id).sum())
        assert batch["pixel_values"].shape == (n_image_ids // N, 3, 32, 32)
        assert n_image_ids == B * N
        # Labels decode to this sample's answers (from the tar, read independently), eos after each.
        for row, sid in enumerate(batch["ids"]):
            answers = [t["value"] for t in truth[sid]["conversations"] if t["from"] == "gpt"]
            lab = batch["labels"][row]
            sup = (lab != IGNORE_INDEX).nonzero().flatten().tolist()
            pieces = tokenizer.decode(lab[sup]).split("</s>")
            assert pieces == [f" {a}" for a in answers] + [""]
        seen += batch["ids"]
    assert len(seen) == len(set(seen)) == 64
    assert set(seen) == set(truth)


def test_datamodule_needs_processor_and_shards(tiny_world, tmp_path):
    root, _ = tiny_world
    with pytest.raises(RuntimeError, match="processor"):
        LMMDataModule(
            train=[str(root / "finetune" / "shard-*.tar")], num_workers=0
        ).train_dataloader()
    with pytest.raises(FileNotFoundError, match="data.train: no shard matches"):
        expand_shards([str(tmp_path / "nothing-*.tar")], "data.train")
    assert (
        expand_shards([str(root / "finetune" / "shard-{000000..000001}.tar")], "x")
        == split_shards(tiny_world, "finetune")[:2]
    )


def test_datamodule_uses_trainer_rank(tiny_world, processor):
    root, _ = tiny_world
    dm = LMMDataModule(
        train=[str(root / "finetune" / "shard-*.tar")], num_workers=0, processor=processor
    )
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    stream = dm.train_dataloader().dataset
    assert (stream.rank, stream.world_size) == (1, 2)


# -- splitting across nodes and workers -------------------------------------------------------------


def test_shard_slice_is_a_partition():
    urls = [f"s{i}" for i in range(11)]
    parts = {(r, w): shard_slice(urls, r, 2, w, 3) for r in range(2) for w in range(3)}
    flat = [u for p in parts.values() for u in p]
    assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))
    assert parts[(0, 0)] == ["s0", "s6"] and parts[(1, 2)] == ["s5"]
    # More slots than shards: some get none, none get a duplicate.
    few = [shard_slice(["a", "b"], r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(sum(few, [])) == ["a", "b"]


def test_ranks_and_workers_read_disjoint_complete_shares(tiny_world):
    shards = split_shards(tiny_world, "finetune")
    assert len(shards) == 4
    per_slot: dict[tuple[int, int], set[str]] = {}
    for rank in range(2):
        stream = ShardStream(
            shards,
            key_of,
            ids_of,
            batch_size=5,
            shuffle_shards=True,
            shuffle_buffer=8,
            seed=3,
            rank=rank,
            world_size=2,
        )
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        for batch in loader:
            # Each shard holds 16 consecutive keys, so a batch's shard tells which slot read it.
            shard_ids = {int(k.split("-")[1]) // 16 for k in batch["ids"]}
            assert len(shard_ids) == 1, batch["ids"]  # a worker reads one shard here
            per_slot.setdefault((rank, shard_ids.pop()), set()).update(batch["ids"])
    ids = [k for s in per_slot.values() for k in s]
    assert len(per_slot) == 4  # each of the 4 shards read by exactly one (rank, worker)
    assert len(ids) == len(set(ids)) == 64
    assert set(ids) == {f"train-{i:06d}" for i in range(64)}


def test_ranks_get_disjoint_samples_without_workers(tiny_world):
    shards = split_shards(tiny_world, "pretrain")
    got = []
    for rank in range(2):
        stream = ShardStream(
            shards,
            key_of,
            ids_of,
            batch_size=7,
            shuffle_shards=True,
            seed=1,
            rank=rank,
            world_size=2,
        )
        got.append([k for b in stream for k in b["ids"]])
    assert len(got[0]) == len(got[1]) == 32
    assert not set(got[0]) & set(got[1])
    assert set(got[0]) | set(got[1]) == {f"train-{i:06d}" for i in range(64)}


# -- skipped samples ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_shard(tiny_world, tmp_path_factory) -> tuple[str, list[str], Counter]:
    """5 good samples interleaved with 4 bad ones, written with webdataset.TarWriter."""
    good = read_tar(Path(split_shards(tiny_world, "finetune")[0]))
    good_keys = sorted(good)[:5]
    conv_ok = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    bad = [
        (
            "bad-image",
            {"json": json_bytes({"conversations": conv_ok}), "png": b"\x89PNG not really"},
            "image_decode",
        ),
        ("bad-json", {"json": b'{"conversations": [', "png": png_bytes()}, "malformed"),
        (
            "no-image-token",
            {
                "json": json_bytes(
                    {
                        "conversations": [
                            {"from": "human", "value": "q"},
                            {"from": "gpt", "value": "a"},
                        ]
                    }
                ),
                "png": png_bytes(),
            },
            "image_count",
        ),
        (
            "no-answer",
            {"json": json_bytes({"conversations": conv_ok[:1]}), "png": png_bytes()},
            "no_assistant",
        ),
    ]
    path = tmp_path_factory.mktemp("planted") / "shard-000000.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, key in enumerate(good_keys):
            sink.write({"__key__": key, **good[key]})
            if i < len(bad):
                k, members, _ = bad[i]
                sink.write({"__key__": k, **members})
    return str(path), good_keys, Counter({reason: 1 for _, _, reason in bad})


@pytest.mark.parametrize("batch_size", [2, 3, 10])
def test_skips_are_counted_and_nothing_is_lost(planted_shard, processor, batch_size):
    path, good_keys, expected_skips = planted_shard
    enc = SampleEncoder(processor, get_template("vicuna"), max_length=256)
    stream = ShardStream(
        [path],
        enc.train_sample,
        partial(collate, pad_id=processor.tokenizer.pad_token_id),
        batch_size=batch_size,
    )
    yielded, skipped = [], Counter()
    for batch in stream:
        yielded += batch["ids"]
        skipped.update(batch["skipped"])
        assert batch["size"] == len(batch["ids"])
        if batch["size"]:
            assert batch["pixel_values"].shape[0] == batch["size"]
    assert sorted(yielded) == good_keys
    assert skipped == expected_skips
    assert len(yielded) + sum(skipped.values()) == 9  # every sample accounted for


def test_skips_alone_still_reach_the_trainer(tmp_path, processor):
    """A stream whose every sample is bad yields one empty batch carrying the counts."""
    path = tmp_path / "all-bad.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(3):
            sink.write({"__key__": f"b{i}", "json": b"nope", "png": png_bytes()})
    enc = SampleEncoder(processor, get_template("vicuna"), max_length=256)
    batches = list(
        ShardStream([str(path)], enc.train_sample, partial(collate, pad_id=0), batch_size=2)
    )
    assert len(batches) == 1
    assert batches[0]["size"] == 0 and batches[0]["skipped"] == {"malformed": 3}


def test_pickled_member_stops_the_stream(tmp_path, processor):
    """Unsafe shards are not a per-sample skip: the stream refuses them outright."""
    from lmm.errors import UnsafeShardError

    path = tmp_path / "unsafe.tar"
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    with wds.TarWriter(str(path), encoder=False) as sink:
        sink.write(
            {"__key__": "ok", "json": json_bytes({"conversations": conv}), "png": png_bytes()}
        )
        sink.write(
            {
                "__key__": "evil",
                "json": json_bytes({"conversations": conv}),
                "png": png_bytes(),
                "x.pyd": b"\x80.",
            }
        )
    enc = SampleEncoder(processor, get_template("vicuna"), max_length=256)
    with pytest.raises(UnsafeShardError, match="'evil'"):
        list(ShardStream([str(path)], enc.train_sample, partial(collate, pad_id=0), batch_size=4))


def test_truncated_shard_is_counted_and_next_shard_read(tiny_world, tmp_path):
    first, second = split_shards(tiny_world, "finetune")[:2]
    data = Path(first).read_bytes()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(
        data[: data.index(b"\x89PNG", len(data) // 2) + 50]
    )  # inside an image's bytes
    batches = list(ShardStream([str(broken), second], key_of, ids_of, batch_size=4))
    ids = [k for b in batches for k in b["ids"]]
    skipped = sum((Counter(b["skipped"]) for b in batches), Counter())
    assert skipped["shard_read"] >= 1
    assert {f"train-{i:06d}" for i in range(16, 32)} <= set(ids)  # the intact shard is complete
    assert len(ids) < 32


# -- order -------------------------------------------------------------------------------------------


def _order(shards, epoch, seed=0, rank=0):
    stream = ShardStream(
        shards,
        key_of,
        ids_of,
        batch_size=8,
        shuffle_buffer=16,
        shuffle_shards=True,
        seed=seed,
        rank=rank,
    )
    stream.epoch = epoch
    return [k for b in stream for k in b["ids"]]


def test_order_is_reproducible_per_seed_and_epoch(tiny_world):
    shards = split_shards(tiny_world, "pretrain")
    e0 = _order(shards, 0)
    assert sorted(e0) == [f"train-{i:06d}" for i in range(64)]
    assert e0 != sorted(e0)  # shuffled
    assert _order(shards, 0) == e0
    assert _order(shards, 1) != e0 and sorted(_order(shards, 1)) == sorted(e0)
    assert _order(shards, 0, seed=1) != e0
    # Within one shard (no shard-order shuffle) the buffer shuffle alone depends on the epoch too.
    one = _order(shards[:1], 0)
    assert one == _order(shards[:1], 0) and one != _order(shards[:1], 1)
    assert one != sorted(one) and sorted(one) == sorted(_order(shards[:1], 1))


def test_epoch_loader_advances_epoch(tiny_world):
    shards = split_shards(tiny_world, "pretrain")
    stream = ShardStream(
        shards, key_of, ids_of, batch_size=8, shuffle_buffer=16, shuffle_shards=True, seed=0
    )
    loader = EpochLoader(stream, batch_size=None, num_workers=0)
    first = [k for b in loader for k in b["ids"]]
    second = [k for b in loader for k in b["ids"]]
    assert first == _order(shards, 0) and second == _order(shards, 1)
    again = EpochLoader(
        ShardStream(
            shards, key_of, ids_of, batch_size=8, shuffle_buffer=16, shuffle_shards=True, seed=0
        ),
        batch_size=None,
        num_workers=0,
    )
    assert [k for b in again for k in b["ids"]] == first
