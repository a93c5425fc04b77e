"""The ``lora`` freeze policy: what trains, adapter files, loading, merging, and a LoRA stage
handing its weights to the next stage through the CLI."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import TINY_SPEC, TOKENS_PER_IMAGE, image_text_batch
from safetensors import safe_open

from lmm.checkpoints.weights import load_weights, save_weights
from lmm.errors import ConfigError
from lmm.model.freeze import FreezeConfig, parameter_table
from lmm.model.lora import LoRAConfig, lora_layers, merge_lora

N = TOKENS_PER_IMAGE
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIGLIP_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _batch(model):
    return image_text_batch(model)


@torch.no_grad()
def _logits(model, batch):
    ids, mask, _, pv = batch
    model.eval()
    return model.llm(inputs_embeds=model.embed(ids, pv), attention_mask=mask).logits


@torch.no_grad()
def _randomise_adapters(model, seed=1):
    """B starts at zero (an untrained adapter changes nothing); give every adapter a real update."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


LORA_BOTH = FreezeConfig(
    vision="lora", vision_lora=LoRAConfig(rank=2, alpha=4, dropout=0.0),
    connector="full", llm="lora", llm_lora=LoRAConfig(rank=4, alpha=8, dropout=0.0),
)  # fmt: skip


def test_lora_trains_adapters_only_and_they_get_gradients(fresh_lmm):
    m = fresh_lmm
    table = m.apply_freeze(LORA_BOTH)
    layers = lora_layers(m)

    # Default targets: every linear layer inside the blocks, nothing outside them.
    def where(s: str) -> str:
        return "self_attn" if s in ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj") else "mlp"

    expected_layers = {
        f"llm.model.layers.{i}.{where(s)}.{s}"
        for i in range(TINY_SPEC.llm_layers)
        for s in LLAMA_LINEARS
    }
    expected_layers |= {
        f"vision.model.encoder.layers.{i}.{where(s)}.{s}"
        for i in range(TINY_SPEC.vision_layers)
        for s in SIGLIP_LINEARS
    }
    assert set(layers) == expected_layers
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert trainable == adapters | {n for n, _ in m.connector.named_parameters(prefix="connector")}
    assert len(adapters) == 2 * len(expected_layers)
    assert layers["llm.model.layers.0.self_attn.q_proj"].scaling["default"] == 2.0  # alpha / rank
    assert layers["vision.model.encoder.layers.0.self_attn.q_proj"].r["default"] == 2

    # One backward: adapters and the connector get gradients, frozen base weights none.
    ids, mask, labels, pv = _batch(m)
    m.train()
    m(ids, mask, labels, pv).backward()
    for n, p in m.named_parameters():
        if n in trainable:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    # B starts at zero, so B's gradient is what moves first (A's is zero on step one).
    assert all(layers[name].lora_B["default"].weight.grad.abs().sum() > 0 for name in layers)

    # The parameter table counts adapters as trainable: rank * (in + out) per layer.
    _, counts = parameter_table(m.components())
    per_layer = {
        name: layer.r["default"] * (layer.in_features + layer.out_features)
        for name, layer in layers.items()
    }
    assert counts["llm"]["trainable"] == sum(
        v for k, v in per_layer.items() if k.startswith("llm.")
    )
    assert counts["vision"]["trainable"] == sum(
        v for k, v in per_layer.items() if k.startswith("vision.")
    )
    assert f"{counts['total']['trainable']:,}" in table.splitlines()[-1]


def test_target_modules_choose_layers_and_unknown_names_are_errors(fresh_lmm):
    m = fresh_lmm
    m.apply_freeze(
        FreezeConfig(
            vision="frozen", llm="lora", llm_lora=LoRAConfig(target_modules=["q_proj", "v_proj"])
        )
    )
    assert {n.rpartition(".")[2] for n in lora_layers(m)} == {"q_proj", "v_proj"}
    assert len(lora_layers(m)) == 2 * TINY_SPEC.llm_layers
    with pytest.raises(ConfigError) as err:
        copy.deepcopy(m).apply_freeze(FreezeConfig(llm="full"))
    assert "model.freeze.llm: the component carries LoRA adapters; merge them" in str(err.value)
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        m.apply_freeze(FreezeConfig(llm="lora", llm_lora=LoRAConfig(rank=16)))
    m.apply_freeze(
        FreezeConfig(
            vision="frozen", llm="lora", llm_lora=LoRAConfig(target_modules=["q_proj", "v_proj"])
        )
    )

    fresh = copy.deepcopy(m)
    merge_lora(fresh)
    with pytest.raises(ConfigError) as err:
        fresh.apply_freeze(
            FreezeConfig(vision="lora", vision_lora=LoRAConfig(target_modules=["qkv"]))
        )
    msg = str(err.value)
    assert "model.freeze.vision_lora.target_modules: 'qkv' names no linear layer" in msg
    assert "fc1" in msg and "out_proj" in msg


def test_merged_model_gives_the_adapter_models_logits(fresh_lmm):
    m = fresh_lmm
    batch = _batch(m)
    base_logits = _logits(m, batch)
    plain_keys = set(m.state_dict())
    m.apply_freeze(LORA_BOTH)
    _randomise_adapters(m)
    adapted = _logits(m, batch)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapters matter
    assert (
        merge_lora(m)
        == len(LLAMA_LINEARS) * TINY_SPEC.llm_layers + len(SIGLIP_LINEARS) * TINY_SPEC.vision_layers
    )
    assert not lora_layers(m) and set(m.state_dict()) == plain_keys
    torch.testing.assert_close(_logits(m, batch), adapted, rtol=0, atol=1e-5)
    m.apply_freeze(FreezeConfig())  # a merged model is a plain model again
    assert all(p.requires_grad for p in m.parameters())


def test_adapter_file_is_small_and_loads_into_adapter_and_plain_models(fresh_lmm, tmp_path):
    pristine = copy.deepcopy(fresh_lmm)
    m = fresh_lmm
    batch = _batch(m)
    m.apply_freeze(LORA_BOTH)
    _randomise_adapters(m)
    with torch.no_grad():  # the connector trains in this stage too
        for p in m.connector.parameters():
            p.add_(0.1)
    adapted = _logits(m, batch)

    adapters, full = tmp_path / "adapters.safetensors", tmp_path / "merged.safetensors"
    save_weights(m, adapters, trainable_only=True)
    save_weights(m, full)
    with safe_open(str(adapters), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(
        ".lora_A.weight" in k or ".lora_B.weight" in k or k.startswith("connector.") for k in keys
    )
    assert not any(
        ".default." in k or "base_layer" in k for k in keys
    )  # no peft internals in files
    assert os.path.getsize(adapters) < 0.2 * os.path.getsize(full)
    with safe_open(str(full), framework="pt") as f:
        assert set(f.keys()) == set(
            pristine.state_dict()
        )  # the full file is a plain (merged) model

    # 1. Back into a model with the same adapters: restored exactly.
    again = copy.deepcopy(pristine)
    again.apply_freeze(LORA_BOTH)
    load_weights(again, adapters)
    for name, layer in lora_layers(again).items():
        torch.testing.assert_close(
            layer.lora_B["default"].weight, lora_layers(m)[name].lora_B["default"].weight
        )
    torch.testing.assert_close(_logits(again, batch), adapted, rtol=0, atol=1e-5)
    # 2. Into a plain model (the next stage's init_from): merged on load.
    plain = copy.deepcopy(pristine)
    load_weights(plain, adapters)
    assert not lora_layers(plain)
    torch.testing.assert_close(_logits(plain, batch), adapted, rtol=0, atol=1e-5)
    # 3. The merged full file into a plain model, and into a model with fresh adapters.
    plain = copy.deepcopy(pristine)
    load_weights(plain, full)
    torch.testing.assert_close(_logits(plain, batch), adapted, rtol=0, atol=1e-5)
    fresh_adapters = copy.deepcopy(pristine)
    fresh_adapters.apply_freeze(LORA_BOTH)  # B = 0: adapters add nothing yet
    load_weights(fresh_adapters, full)
    torch.testing.assert_close(_logits(fresh_adapters, batch), adapted, rtol=0, atol=1e-5)


def test_incomplete_adapter_file_is_an_error(fresh_lmm, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "half.safetensors"
    save_file(
        {"llm.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, TINY_SPEC.llm_width)},
        str(path),
    )
    with pytest.raises(
        ValueError, match="adapter of 'llm.model.layers.0.self_attn.q_proj' is incomplete"
    ):
        load_weights(fresh_lmm, path)


def test_lora_stage_through_the_cli_feeds_the_next_stage(tiny_models, tiny_world, tmp_path):
    """fit with ``model.freeze.llm: lora`` writes a small adapter file; the next stage's
    ``init_from`` starts from the merged weights."""
    from lmm.train.cli import LMMCLI

    root, _ = tiny_world
    common = [
        "--model.vision.name_or_path", str(tiny_models["vision"]), "--model.vision.feature_layer", "-1",
        "--model.llm.name_or_path", str(tiny_models["llm"]), "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path),  # where the saved config.yaml goes
        "--data.train", f"[{root}/finetune/shard-*.tar]", "--data.num_workers", "0", "--data.batch_size", "4",
        "--data.template", "vicuna", "--data.max_length", "96",
    ]  # fmt: skip
    adapters = tmp_path / "lora.safetensors"
    cli = LMMCLI(args=["fit", *common, "--trainer.max_steps", "3", "--model.freeze.vision", "frozen",
                       "--model.freeze.llm", "lora", "--model.freeze.llm_lora.rank", "4",
                       "--model.freeze.llm_lora.target_modules", "[q_proj, v_proj]", "--model.optim.lr_llm", "0.05",
                       "--model.save_weights", str(adapters), "--model.save_trainable_only", "true"])  # fmt: skip
    trained = cli.model.model
    assert cli.trainer.global_step == 3
    assert {n.rpartition(".")[2] for n in lora_layers(trained.llm)} == {"q_proj", "v_proj"}
    with safe_open(str(adapters), framework="pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"connector", "llm"}
    assert (
        len([k for k in keys if k.startswith("llm.")]) == 2 * 2 * TINY_SPEC.llm_layers
    )  # A and B of q, v

    nxt = LMMCLI(args=[*common, "--model.init_from", str(adapters)], run=False).model.model
    assert not lora_layers(nxt)
    pretrained = LMMCLI(args=common, run=False).model.model.state_dict()
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(
        nxt.state_dict()[q], pretrained[q], atol=1e-4
    )  # the adapters were trained and merged
    k = "llm.model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(nxt.state_dict()[k], pretrained[k])  # not a target: untouched
    merge_lora(trained)
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(nxt.state_dict()[k], v, rtol=0, atol=1e-6)
