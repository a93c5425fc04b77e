"""Loss only at supervised positions, in chunks, and sequence packing: the same losses and
gradients as the naive padded path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SPEC, TOKENS_PER_IMAGE

from lmm.constants import IGNORE_INDEX
from lmm.data.collate import collate
from lmm.data.packing import assign_rows, pack
from lmm.model.loss import chunked_cross_entropy

# -- chunked cross-entropy ---------------------------------------------------------------------


def _naive(hidden, targets, head, softcap=None):
    logits = head(hidden).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 3.0)])
def test_chunked_cross_entropy_matches_full_logits(chunk_size, bias, softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=bias)
    targets = torch.randint(0, 50, (23,), generator=g)

    loss = chunked_cross_entropy(hidden, targets, head, chunk_size, softcap)
    loss.backward()
    got = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    ref = _naive(hidden, targets, head, softcap)
    ref.backward()
    want = [hidden.grad] + [p.grad for p in head.parameters()]

    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_cross_entropy_frozen_head_gets_no_gradient():
    hidden = torch.randn(5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11).requires_grad_(False)
    chunked_cross_entropy(hidden, torch.arange(5), head, 2).backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_chunked_cross_entropy_scales_with_upstream_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    (3.0 * chunked_cross_entropy(hidden, torch.arange(4), head, 3)).backward()
    g3 = hidden.grad.clone()
    hidden.grad = None
    chunked_cross_entropy(hidden, torch.arange(4), head, 3).backward()
    torch.testing.assert_close(g3, 3.0 * hidden.grad)


def test_lmm_loss_and_gradients_equal_naive_full_logits(fresh_lmm):
    """LMM.forward (head at supervised positions, chunked) vs HF's own loss on full logits."""
    from conftest import image_text_batch

    model = fresh_lmm.train()
    model.loss_chunk_size = 3  # several chunks on this small batch
    ids, mask, labels, pv = image_text_batch(model)

    loss = model(ids, mask, labels, pv)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    embeds = model.embed(ids, pv)
    ref = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    ref.backward()
    theirs = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert ours.keys() == theirs.keys() and any(n.startswith("connector") for n in ours)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-4, msg=name)


# -- packing ----------------------------------------------------------------------------------


def test_assign_rows_first_fit_decreasing():
    assert assign_rows([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    rows = assign_rows([9, 12, 1], 10)  # an overlong sample gets a row of its own
    assert rows == [[1], [0, 2]]
    lengths = torch.randint(1, 40, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = assign_rows(lengths, 40)
    assert sorted(i for r in rows for i in r) == list(range(50))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)


def _samples(model, n: int, seed: int) -> list[dict]:
    """Encoded training samples of mixed lengths; every third is text-only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        n_images = 0 if k % 3 == 2 else 1
        prompt = torch.randint(10, 500, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        answer = torch.randint(
            10, 500, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g
        )
        image = torch.full((TOKENS_PER_IMAGE * n_images,), model.image_token_id)
        ids = torch.cat([torch.tensor([1]), image, prompt, answer, torch.tensor([2])])
        labels = ids.clone()
        labels[: len(ids) - len(answer) - 1] = IGNORE_INDEX
        size = TINY_SPEC.image_size
        out.append(
            {
                "id": f"s{k}",
                "input_ids": ids,
                "labels": labels,
                "pixel_values": torch.randn(n_images, 3, size, size, generator=g),
            }
        )
    return out


def test_packed_batch_layout(lmm_model):
    samples = _samples(lmm_model, 7, seed=0)
    lengths = [len(s["input_ids"]) for s in samples]
    batch = pack(samples, pad_id=0, budget=max(lengths) * 2)
    assert batch["size"] == 7 and batch["ids"] == [s["id"] for s in samples]
    assert batch["input_ids"].shape[0] < 7  # fewer rows than samples
    assert int(batch["attention_mask"].sum()) == sum(lengths)
    for i, s in enumerate(samples):
        where = batch["sample_index"] == i
        assert torch.equal(batch["input_ids"][where], s["input_ids"])
        assert torch.equal(batch["position_ids"][where], torch.arange(len(s["input_ids"])))
    # Images are in the order their <image> spans appear, row-major.
    order = [int(i) for i in batch["sample_index"].flatten().unique_consecutive() if i >= 0]
    want = torch.cat([samples[i]["pixel_values"] for i in order])
    assert torch.equal(batch["pixel_values"], want)


def test_packed_and_padded_per_sample_losses_agree(lmm_model):
    samples = _samples(lmm_model, 9, seed=2)
    padded = collate(samples, pad_id=0)
    budget = max(len(s["input_ids"]) for s in samples) * 3
    packed = pack(samples, pad_id=0, budget=budget)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    a = lmm_model.sample_losses(padded)
    b = lmm_model.sample_losses(packed)
    assert a.shape == (9,) and torch.isfinite(a).all()
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    with torch.no_grad():
        mean_padded = lmm_model(
            padded["input_ids"], padded["attention_mask"], padded["labels"], padded["pixel_values"]
        )
        mean_packed = lmm_model(
            packed["input_ids"],
            packed["attention_mask"],
            packed["labels"],
            packed["pixel_values"],
            packed["position_ids"],
        )
    torch.testing.assert_close(mean_packed, mean_padded, atol=1e-5, rtol=0)


def test_packed_samples_do_not_attend_to_each_other(lmm_model):
    """Changing one sample's tokens leaves the losses of the samples packed beside it unchanged."""
    samples = _samples(lmm_model, 4, seed=3)
    budget = sum(len(s["input_ids"]) for s in samples)  # all four in one row
    before = lmm_model.sample_losses(pack(samples, pad_id=0, budget=budget))
    changed = [dict(s) for s in samples]
    ids = changed[1]["input_ids"].clone()
    ids[-3:-1] = torch.tensor([77, 78])
    changed[1]["input_ids"] = ids
    changed[1]["pixel_values"] = changed[1]["pixel_values"] + 1.0
    batch = pack(changed, pad_id=0, budget=budget)
    assert batch["input_ids"].shape[0] == 1
    after = lmm_model.sample_losses(batch)
    keep = [0, 2, 3]
    torch.testing.assert_close(after[keep], before[keep], atol=1e-6, rtol=0)
    assert not torch.allclose(after[1], before[1])


def test_pack_length_below_max_length_is_a_config_error():
    from lmm.data.datamodule import LMMDataModule
    from lmm.errors import ConfigError

    with pytest.raises(ConfigError, match="data.pack_length=64 is below data.max_length=128"):
        LMMDataModule(train=["x"], max_length=128, pack_length=64)


@pytest.fixture(scope="module")
def family_lms(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM

    from lmm.standins.llm import FAMILIES, build_llm

    root = tmp_path_factory.mktemp("pack_families")
    return {
        name: AutoModelForCausalLM.from_pretrained(build_llm(name, root / name)).eval()
        for name in FAMILIES
    }


@pytest.mark.parametrize("family", ["gemma", "llama", "phi", "qwen2", "stablelm"])
def test_packing_confines_attention_for_every_family(family_lms, family):
    """Each family's decoder, fed a packed row with restarting position ids, gives every
    sample the hidden states it has alone."""
    lm = family_lms[family]
    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(5, 200, (n,), generator=g) for n in (7, 4, 9)]
    row = torch.cat(parts).unsqueeze(0)
    positions = torch.cat([torch.arange(len(p)) for p in parts]).unsqueeze(0)
    with torch.no_grad():
        packed = lm.get_decoder()(
            input_ids=row, position_ids=positions, use_cache=False
        ).last_hidden_state[0]
        alone = [
            lm.get_decoder()(input_ids=p.unsqueeze(0), use_cache=False).last_hidden_state[0]
            for p in parts
        ]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_choose_rows_computes_the_fewest_tokens():
    from lmm.data.packing import choose_rows

    # Capacity 10 (the longest): [10], [6, 4], [5, 5] -> 3 rows x 10 = 30 computed, no padding.
    # Capacity 30 (the budget) would put everything in one row of 30: the same 30, but wider
    # rows cost more attention, so the narrower packing wins the tie.
    assert sorted(map(sorted, choose_rows([10, 6, 5, 5, 4], 30))) == [[0], [1, 4], [2, 3]]
    # [8, 8, 1]: capacity 8 -> 3 rows x 8 = 24; 16 -> [8, 8], [1] = 2 x 16 = 32; 24 -> one row of 17.
    lengths = [8, 8, 1]
    rows = choose_rows(lengths, 32)
    assert (
        sum(len(r) for r in rows) == 3
        and len(rows) * max(sum(lengths[i] for i in r) for r in rows) == 17
    )
