"""Freeze policies: which parameters train, which receive gradients, and the parameter table."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SPEC, TOKENS_PER_IMAGE, image_text_batch

from lmm.model.freeze import FreezeConfig, apply_policy, parameter_table

N = TOKENS_PER_IMAGE


def _backward(model) -> None:
    """One loss.backward() on a 2-sample batch with an image each."""
    model.train()
    model.zero_grad(set_to_none=True)
    ids, mask, labels, pv = image_text_batch(model)
    loss = model(ids, mask, labels, pv)
    assert torch.isfinite(loss)
    loss.backward()


def _has_grad(p) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def _siglip_layer_params(d: int) -> int:
    """Parameters of one SigLIP encoder layer of width d with a 4d MLP, counted by hand."""
    layer_norms = 2 * (2 * d)
    attention = 4 * (d * d + d)  # q, k, v, out projections with bias
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    return layer_norms + attention + mlp


def test_partial_vision_full_connector_frozen_llm(fresh_lmm):
    m = fresh_lmm
    table = m.apply_freeze(
        FreezeConfig(vision="partial", vision_from_layer=1, connector="full", llm="frozen")
    )
    _backward(m)
    names = dict(m.named_parameters())
    trains = {n for n, p in names.items() if p.requires_grad}
    got_grad = {n for n, p in names.items() if _has_grad(p)}
    expected = {
        n
        for n in names
        if n.startswith("vision.model.encoder.layers.1.") or n.startswith("connector.")
    }
    assert trains == expected
    assert got_grad == expected  # every trainable parameter gets a gradient, nothing else does
    assert all(names[n].grad is None for n in names if n not in expected)
    # Sanity of the naming: all three groups are present.
    assert any(n.startswith("vision.model.embeddings.") for n in names)
    assert any(n.startswith("vision.model.encoder.layers.0.") for n in names)
    assert any(n.startswith("llm.") for n in names)

    # The table: counts of trainable/frozen parameters, checked against a hand count.
    d, patch, grid = (
        TINY_SPEC.vision_width,
        TINY_SPEC.patch_size,
        TINY_SPEC.image_size // TINY_SPEC.patch_size,
    )
    layer = _siglip_layer_params(d)
    embeddings = (3 * patch * patch * d + d) + grid * grid * d
    assert layer == sum(p.numel() for p in m.vision.blocks()[1].parameters())
    text, counts = parameter_table(m.components())
    assert counts["vision"] == {
        "trainable": layer,
        "frozen": embeddings + layer,
        "total": embeddings + 2 * layer,
    }
    dl = TINY_SPEC.llm_width
    connector = (d * dl + dl) + (dl * dl + dl)  # mlp2x_gelu: Linear(Dv, Dl), GELU, Linear(Dl, Dl)
    assert counts["connector"] == {"trainable": connector, "frozen": 0, "total": connector}
    llm_total = sum(p.numel() for p in m.llm.parameters())
    assert counts["llm"] == {"trainable": 0, "frozen": llm_total, "total": llm_total}
    assert counts["total"]["trainable"] == layer + connector
    assert text == table
    assert f"{layer + connector:,}" in text.splitlines()[-1]


def test_partial_llm_trains_later_blocks_norm_and_head(fresh_lmm):
    m = fresh_lmm
    m.apply_freeze(
        FreezeConfig(vision="frozen", connector="frozen", llm="partial", llm_from_layer=1)
    )
    _backward(m)
    names = dict(m.named_parameters())
    expected = {
        n
        for n in names
        if n.startswith("llm.model.layers.1.")
        or n.startswith("llm.model.norm.")
        or n.startswith("llm.lm_head.")
    }
    assert any(n.startswith("llm.lm_head.") for n in expected) and any(
        n.startswith("llm.model.norm.") for n in expected
    )
    assert {n for n, p in names.items() if p.requires_grad} == expected
    assert {n for n, p in names.items() if _has_grad(p)} == expected


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_partial_llm_keeps_a_tied_head_frozen_with_the_embeddings(tmp_path, family):
    """Gemma and small Qwen2 tie the output head to the token embeddings (stand-ins of the real
    classes): under ``partial`` that one matrix stays frozen, gets no gradient, and the input
    embeddings do not move; the later blocks and the final norm train."""
    from lmm.model.freeze import apply_policy
    from lmm.model.language import (
        LanguageConfig,
        decoder_blocks,
        load_language_model,
        load_tokenizer,
    )
    from lmm.standins.llm import build_llm

    cfg = LanguageConfig(name_or_path=str(build_llm(family, tmp_path / family)))
    llm = load_language_model(cfg, load_tokenizer(cfg))
    head, embeddings = llm.get_output_embeddings().weight, llm.get_input_embeddings().weight
    assert head is embeddings  # tied
    apply_policy(llm, "partial", decoder_blocks(llm), 1, "model.freeze.llm")
    names = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert not head.requires_grad
    assert names and all(".layers.1." in n or n == "model.norm.weight" for n in names)
    assert any(".layers.1." in n for n in names) and "model.norm.weight" in names
    before = embeddings.detach().clone()
    llm(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    assert head.grad is None
    assert all(p.grad is not None for n, p in llm.named_parameters() if n in names)
    torch.optim.SGD([p for p in llm.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(embeddings, before)


def test_frozen_tower_runs_without_autograd_but_connector_learns(fresh_lmm):
    m = fresh_lmm
    m.apply_freeze(FreezeConfig(vision="frozen", connector="full", llm="frozen"))
    _backward(m)
    assert all(p.grad is None for p in m.vision.parameters())
    assert all(p.grad is None for p in m.llm.parameters())
    assert all(_has_grad(p) for p in m.connector.parameters())


def test_partial_boundaries(fresh_lmm):
    m = fresh_lmm
    blocks = m.vision.blocks()
    # from_layer 0: every block trains but the embeddings stay frozen.
    m.apply_freeze(FreezeConfig(vision="partial", vision_from_layer=0))
    assert all(p.requires_grad for p in blocks.parameters())
    assert not any(p.requires_grad for p in m.vision.model.embeddings.parameters())
    # from_layer == number of blocks: nothing in the tower trains.
    m.apply_freeze(FreezeConfig(vision="partial", vision_from_layer=len(blocks)))
    assert not any(p.requires_grad for p in m.vision.parameters())
    # full / frozen are all or nothing, and re-applying a policy resets the previous one.
    m.apply_freeze(FreezeConfig(vision="full", llm="full"))
    assert all(p.requires_grad for p in m.parameters())
    m.apply_freeze(FreezeConfig(vision="frozen", connector="frozen", llm="frozen"))
    assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("from_layer", [-1, 3, 99])
def test_out_of_range_from_layer(fresh_lmm, from_layer):
    with pytest.raises(ValueError) as info:
        fresh_lmm.apply_freeze(FreezeConfig(vision="partial", vision_from_layer=from_layer))
    assert f"model.freeze.vision_from_layer={from_layer}" in str(info.value)
    assert "[0, 2]" in str(info.value)
    with pytest.raises(ValueError, match="model.freeze.llm_from_layer=5"):
        fresh_lmm.apply_freeze(FreezeConfig(llm="partial", llm_from_layer=5))


def test_unknown_policy_and_partial_without_blocks(fresh_lmm):
    with pytest.raises(ValueError) as info:
        fresh_lmm.apply_freeze(FreezeConfig(vision="parital"))
    assert "model.freeze.vision" in str(info.value) and "'parital'" in str(info.value)
    assert "allowed: full, frozen, partial, lora" in str(info.value)
    with pytest.raises(
        ValueError, match="model.freeze.connector: 'partial' needs a component with blocks"
    ):
        fresh_lmm.apply_freeze(FreezeConfig(connector="partial"))
    with pytest.raises(ValueError, match="unknown policy"):
        apply_policy(fresh_lmm.connector, "", None, 0, "x")


def test_parameter_table_counts_tied_weights_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    module = torch.nn.ModuleDict({"emb": emb, "head": head})
    _, counts = parameter_table({"lm": module})
    assert counts["lm"]["total"] == 40
    module["emb"].weight.requires_grad_(False)
    _, counts = parameter_table({"lm": module})
    assert counts["lm"] == {"trainable": 0, "frozen": 40, "total": 40}


def test_describe_names_only_the_options_in_use():
    from lmm.model.lora import LoRAConfig

    assert FreezeConfig().describe() == "vision full, connector full, llm full"
    cfg = FreezeConfig(
        vision="partial",
        vision_from_layer=12,
        connector="frozen",
        llm="lora",
        llm_lora=LoRAConfig(rank=64, alpha=128),
    )
    assert cfg.describe() == "vision partial from 12, connector frozen, llm lora r64 alpha 128"
