"""LMM: feature merge, loss, vision features, generation and weight files."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_SPEC, TOKENS_PER_IMAGE
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmm.checkpoints.weights import load_weights, save_weights
from lmm.constants import IGNORE_INDEX
from lmm.data.collate import collate
from lmm.errors import ImageTokenMismatchError
from lmm.model.freeze import FreezeConfig
from lmm.model.towers import VisionConfig, build_vision_tower

N = TOKENS_PER_IMAGE


def _sample(model, sid, prefix, images, suffix, answer=None):
    """ids: <s> prefix (<image> x N per image) suffix [answer]; labels on the answer only."""
    tok = model.tokenizer
    ids = [tok.bos_token_id] + tok(prefix, add_special_tokens=False)["input_ids"]
    for _ in range(images):
        ids += [model.image_token_id] * N
    ids += tok(suffix, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    if answer is not None:
        ans = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += ans
        labels += ans
    g = torch.Generator().manual_seed(sum(map(ord, sid)) * 7 + images)  # distinct pixels per sample
    pv = torch.randn(images, 3, TINY_SPEC.image_size, TINY_SPEC.image_size, generator=g)
    return {
        "id": sid,
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": pv,
    }


@pytest.fixture(scope="module")
def batch(lmm_model):
    a = _sample(lmm_model, "a", "USER: ", 1, "\nWhat color is the circle? ASSISTANT:", " red")
    b = _sample(
        lmm_model,
        "bb",
        "USER: Compare ",
        2,
        "\nSame? ASSISTANT:",
        " Yes, both show a red circle in the center.",
    )
    assert len(a["input_ids"]) != len(b["input_ids"])
    return collate([a, b], pad_id=lmm_model.tokenizer.pad_token_id)


# -- merge --------------------------------------------------------------------------------------


def test_embed_matches_per_sample_loop(lmm_model, batch):
    m = lmm_model
    ids, pv = batch["input_ids"], batch["pixel_values"]
    assert pv.shape[0] == 3 and batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    with torch.no_grad():
        merged = m.embed(ids, pv)
        table = m.llm.get_input_embeddings().weight
        features = m.connector(m.vision(pv))  # [3, N, D]
        ref = torch.empty_like(merged)
        image = 0
        for row in range(ids.shape[0]):
            t = 0
            while t < ids.shape[1]:
                if (
                    ids[row, t] == m.image_token_id
                ):  # a span of N ids takes the next image's features
                    ref[row, t : t + N] = features[image]
                    image += 1
                    t += N
                else:
                    ref[row, t] = table[ids[row, t]]
                    t += 1
        assert image == 3
    assert merged.shape == (2, ids.shape[1], table.shape[1])
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-6)
    # Images really differ, so an order mix-up would show.
    assert not torch.allclose(features[1], features[2])


def test_embed_without_images_is_token_embedding(lmm_model):
    ids = torch.tensor([[1, 10, 11, 12]])
    with torch.no_grad():
        out = lmm_model.embed(ids, None)
        assert torch.equal(out, lmm_model.llm.get_input_embeddings()(ids))
        empty = torch.zeros(0, 3, TINY_SPEC.image_size, TINY_SPEC.image_size)
        assert torch.equal(lmm_model.embed(ids, empty), out)


def test_image_token_mismatch_raises(lmm_model, batch):
    ids, pv = batch["input_ids"], batch["pixel_values"]
    fewer = ids.clone()
    pos = int((fewer[0] == lmm_model.image_token_id).nonzero()[0])
    fewer[0, pos] = 10
    with pytest.raises(ImageTokenMismatchError, match=f"{3 * N - 1} <image> positions but 3 image"):
        lmm_model.embed(fewer, pv)
    with pytest.raises(ImageTokenMismatchError):
        lmm_model.embed(ids, pv[:2])
    with pytest.raises(ImageTokenMismatchError):
        lmm_model.embed(ids, None)
    with pytest.raises(ImageTokenMismatchError):
        lmm_model.embed(torch.tensor([[1, 10, 11]]), pv[:1])


# -- loss ---------------------------------------------------------------------------------------


def test_loss_equals_hf_loss_on_merged_embeddings(lmm_model, batch):
    m = lmm_model
    with torch.no_grad():
        loss = m(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"]
        )
        embeds = m.embed(batch["input_ids"], batch["pixel_values"])
        ref = m.llm(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        # And by hand: full logits, shifted, mean over supervised targets.
        logits = m.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        tgt = batch["labels"][:, 1:]
        keep = tgt != IGNORE_INDEX
        by_hand = nn.functional.cross_entropy(logits[:, :-1][keep], tgt[keep])
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert keep.sum() == (batch["labels"] != IGNORE_INDEX).sum()  # no label on position 0
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, by_hand, rtol=0, atol=1e-5)


def test_loss_ignores_padding_and_unsupervised_tokens(lmm_model, batch):
    """Changing an ignored prompt token after all answers, or padding, leaves the loss alone;
    changing a supervised target changes it."""
    m = lmm_model
    with torch.no_grad():
        base = m(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"]
        )
        labels = batch["labels"].clone()
        ids = batch["input_ids"].clone()
        pad_cols = batch["attention_mask"][0] == 0
        ids[0, pad_cols] = 17  # garbage where the first row is padded
        same = m(ids, batch["attention_mask"], labels, batch["pixel_values"])
        sup = (labels[1] != IGNORE_INDEX).nonzero().flatten()
        labels[1, sup[0]] = (labels[1, sup[0]] + 1) % 400
        other = m(batch["input_ids"], batch["attention_mask"], labels, batch["pixel_values"])
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    assert not torch.allclose(other, base)


# -- vision tower -------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_layer, kept_layers", [(-1, 2), (-2, 1), (1, 1), (2, 2)])
def test_vision_features_equal_hidden_state_of_untruncated_model(
    tiny_models, feature_layer, kept_layers
):
    from transformers import SiglipVisionModel

    path = str(tiny_models["vision"])
    reference = SiglipVisionModel.from_pretrained(path).eval()
    tower = build_vision_tower(VisionConfig(name_or_path=path, feature_layer=feature_layer)).eval()
    pv = torch.randn(
        2, 3, TINY_SPEC.image_size, TINY_SPEC.image_size, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = reference(pixel_values=pv, output_hidden_states=True).hidden_states[
            feature_layer
        ]
        got = tower(pv)
    assert len(tower.blocks()) == kept_layers
    assert got.shape == (2, N, TINY_SPEC.vision_width)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # No parameter is left that cannot influence the features (no post norm / head).
    assert not any("post_layernorm" in n or ".head." in n for n, _ in tower.named_parameters())


@pytest.mark.parametrize("feature_layer", [0, -3, 3])
def test_vision_feature_layer_out_of_range(tiny_models, feature_layer):
    with pytest.raises(ValueError, match="model.vision.feature_layer"):
        build_vision_tower(
            VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=feature_layer)
        )


def test_num_image_tokens_is_patch_grid(lmm_model):
    assert lmm_model.num_image_tokens == (TINY_SPEC.image_size // TINY_SPEC.patch_size) ** 2 == 16
    assert lmm_model.vision.image_spec.size == TINY_SPEC.image_size
    assert lmm_model.vision.image_spec.mean == (0.5, 0.5, 0.5)


# -- generation ---------------------------------------------------------------------------------


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_left_padded_batch_generation_equals_single(lmm_model):
    m = lmm_model
    prompts = [
        _sample(m, "p0", "USER: ", 1, "\nWhat color is the circle? ASSISTANT:"),
        _sample(
            m,
            "p1",
            "A chat. USER: ",
            1,
            "\nDescribe the image. How many shapes are there? ASSISTANT:",
        ),
        _sample(m, "p2", "", 1, "Yes"),
    ]
    assert len({len(p["input_ids"]) for p in prompts}) == 3
    b = collate(prompts, pad_id=m.tokenizer.pad_token_id, left=True)
    assert (b["attention_mask"][:, -1] == 1).all() and (b["attention_mask"][:, 0] == 0).any()
    new = 6
    batched = m.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], max_new_tokens=new)
    assert batched.shape[0] == 3 and batched.shape[1] <= new  # only the new tokens come back
    eos = m.tokenizer.eos_token_id
    for row, p in enumerate(prompts):
        ids = p["input_ids"][None]
        single = m.generate(ids, torch.ones_like(ids), p["pixel_values"], max_new_tokens=new)
        assert _until_eos(batched[row].tolist(), eos) == _until_eos(single[0].tolist(), eos), row
        # Greedy decoding is the argmax of the full-sequence logits at every step.
        with torch.no_grad():
            step_ids = ids
            embeds = m.embed(step_ids, p["pixel_values"])
            for t in single[0].tolist()[:2]:
                nxt = int(m.llm(inputs_embeds=embeds).logits[0, -1].argmax())
                assert nxt == t
                embeds = torch.cat(
                    [embeds, m.llm.get_input_embeddings()(torch.tensor([[t]]))], dim=1
                )


# -- weight files -------------------------------------------------------------------------------


def test_save_load_round_trip(lmm_model, tmp_path):
    path = tmp_path / "w.safetensors"
    n = save_weights(lmm_model, path)
    state = lmm_model.state_dict()
    assert n == len(state)
    other = copy.deepcopy(lmm_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    loaded = load_weights(other, path)
    assert loaded == sorted(state)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not (tmp_path / "w.safetensors.tmp").exists()


def test_load_rejects_unexpected_and_misshaped_tensors(lmm_model, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file(
        {
            "connector.layers.0.weight": lmm_model.connector.layers[0].weight.detach().clone(),
            "bogus.weight": torch.zeros(2),
        },
        str(bad),
    )
    with pytest.raises(ValueError, match="bogus.weight"):
        load_weights(copy.deepcopy(lmm_model), bad)
    misshaped = tmp_path / "shape.safetensors"
    save_file({"connector.layers.0.weight": torch.zeros(3, 3)}, str(misshaped))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_weights(copy.deepcopy(lmm_model), misshaped)
    with pytest.raises(FileNotFoundError):
        load_weights(lmm_model, tmp_path / "missing.safetensors")


def test_trainable_only_writes_only_trainable_tensors(fresh_lmm, tmp_path):
    fresh_lmm.apply_freeze(FreezeConfig(vision="frozen", connector="full", llm="frozen"))
    path = tmp_path / "conn.safetensors"
    n = save_weights(fresh_lmm, path, trainable_only=True)
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
    expected = sorted(f"connector.{k}" for k in fresh_lmm.connector.state_dict())
    assert keys == expected and n == len(expected) == 4  # two Linear layers: weight + bias each
    assert n < save_weights(fresh_lmm, tmp_path / "all.safetensors")
    # Loading a partial file changes only those tensors.
    target = copy.deepcopy(fresh_lmm)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    load_weights(target, path)
    for k, v in target.state_dict().items():
        if k.startswith("connector."):
            assert torch.equal(v, fresh_lmm.state_dict()[k])
        else:
            assert torch.equal(v, before[k])


def test_tied_weights_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    src = Tied()
    path = tmp_path / "tied.safetensors"
    assert save_weights(src, path) == 2  # one tensor + one alias
    with safe_open(str(path), framework="pt") as f:
        assert len(list(f.keys())) == 1
    dst = Tied()
    assert load_weights(dst, path) == ["emb.weight", "head.weight"]
    assert torch.equal(dst.emb.weight, src.emb.weight) and dst.head.weight is dst.emb.weight
