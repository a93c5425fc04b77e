"""Vision towers of every kind: token counts, features against the library's own computation,
blocks and partial freezing, image specs, and the errors for missing weights and bad options.

Every tower is a tiny random-init model of the real class, saved the way the real one is
published (``lmm.standins.vision``) and loaded by ``build_vision_tower``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmm.data.image import ImageTransform
from lmm.errors import ConfigError, MissingWeightsError, UnknownComponentError
from lmm.model.freeze import apply_policy
from lmm.model.towers import VISION_TOWERS, VisionConfig, build_vision_tower
from lmm.standins.vision import STANDIN_TOWERS, build_tower

KINDS = list(STANDIN_TOWERS)  # clip, siglip, open_clip, timm_vit, timm_cnn, dinov2, ...


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    out = tmp_path_factory.mktemp("towers")
    return {kind: build_tower(kind, out) for kind in KINDS}


def _pixels(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tower(standin, **overrides):
    return build_vision_tower(standin.vision_config(**overrides)).eval()


# -- the stand-ins load and describe themselves ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_standin_loads_with_the_advertised_shape_and_spec(standins, kind):
    s = standins[kind]
    tower = _tower(s)
    with torch.no_grad():
        out = tower(_pixels(s.image_size))
    assert out.shape == (2, s.num_tokens, s.hidden_size)
    assert (tower.num_tokens, tower.hidden_size) == (s.num_tokens, s.hidden_size)
    assert len(tower.blocks()) == s.default_blocks
    spec = tower.image_spec
    assert spec.size == s.image_size and spec.preprocess == "pad"
    torch.testing.assert_close(torch.tensor(spec.mean), torch.tensor(s.mean))
    torch.testing.assert_close(torch.tensor(spec.std), torch.tensor(s.std))
    # Different images give different features (the tower is really looking at the pixels).
    assert not torch.allclose(out[0], out[1])


def test_unknown_standin_and_unknown_kind():
    with pytest.raises(
        ConfigError, match="known: clip, siglip, open_clip, timm_vit, timm_cnn, dinov2"
    ):
        build_tower("clip_vit", "/nonexistent")
    with pytest.raises(UnknownComponentError) as info:
        build_vision_tower(VisionConfig(kind="timm_vit"))
    assert "model.vision.kind" in str(info.value) and "known: fused, hf, open_clip, timm" in str(
        info.value
    )
    assert VISION_TOWERS.names() == ["fused", "hf", "open_clip", "timm"]


# -- transformers CLIP / SigLIP -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer", [None, -1, 1])
@pytest.mark.parametrize("select", ["auto", "patch", "full"])
def test_hf_features_are_the_models_hidden_state(standins, kind, feature_layer, select):
    from transformers import CLIPVisionModel, SiglipVisionModel

    s = standins[kind]
    reference = (
        {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}[kind]
        .from_pretrained(s.name_or_path)
        .eval()
    )
    tower = _tower(s, feature_layer=feature_layer, select=select)
    grid = (s.image_size // 8) ** 2
    cls = 1 if kind == "clip" else 0  # SigLIP has no CLS token
    dropped = {"auto": cls, "patch": 1, "full": 0}[select]
    assert tower.num_tokens == grid + cls - dropped
    pv = _pixels(s.image_size)
    with torch.no_grad():
        layer = -2 if feature_layer is None else feature_layer
        expected = reference(pixel_values=pv, output_hidden_states=True).hidden_states[layer][
            :, dropped:
        ]
        got = tower(pv)
    assert got.shape == (2, tower.num_tokens, s.hidden_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert len(tower.blocks()) == {None: 2, -1: 3, 1: 1}[feature_layer]


@pytest.mark.parametrize("model_type, tokens", [("siglip", 729), ("clip", 729)])
def test_27x27_grid_gives_729_tokens(tmp_path, model_type, tokens):
    """SigLIP keeps all 27*27 patches; CLIP has 730 tokens and drops its CLS."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    config_class, model_class = {
        "siglip": (SiglipVisionConfig, SiglipVisionModel),
        "clip": (CLIPVisionConfig, CLIPVisionModel),
    }[model_type]
    cfg = config_class(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=54,
        patch_size=2,
    )
    model_class(cfg).save_pretrained(tmp_path)
    tower = build_vision_tower(VisionConfig(name_or_path=str(tmp_path))).eval()
    assert tower.num_tokens == tokens
    with torch.no_grad():
        assert tower(_pixels(54, n=1)).shape == (1, tokens, 8)


def test_hf_refuses_other_model_types(tmp_path):
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    ).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as info:
        build_vision_tower(VisionConfig(name_or_path=str(tmp_path)))
    msg = str(info.value)
    assert (
        "'vit'" in msg and "clip, clip_vision_model, dinov2, dinov2_with_registers, siglip" in msg
    )


# -- transformers DINOv2 ------------------------------------------------------------------------


def _dinov2_reference(path: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()  # Dinov2Model / Dinov2WithRegistersModel


@pytest.mark.parametrize("kind, registers", [("dinov2", 0), ("dinov2_registers", 4)])
@pytest.mark.parametrize("feature_layer", [None, -1, 1])
@pytest.mark.parametrize("select", ["auto", "patch", "full"])
def test_dinov2_features_are_the_models_hidden_state(
    standins, kind, registers, feature_layer, select
):
    """Tokens = grid^2 + CLS + registers - dropped; features = transformers' own hidden state
    (the layer's output before the final layernorm), CLS and registers dropped under auto."""
    s = standins[kind]
    reference = _dinov2_reference(s.name_or_path)
    assert getattr(reference.config, "num_register_tokens", 0) == registers
    tower = _tower(s, feature_layer=feature_layer, select=select)
    dropped = {"auto": 1 + registers, "patch": 1, "full": 0}[select]
    assert tower.num_tokens == (s.image_size // 8) ** 2 + 1 + registers - dropped
    pv = _pixels(s.image_size)
    with torch.no_grad():
        layer = -2 if feature_layer is None else feature_layer
        expected = reference(pixel_values=pv, output_hidden_states=True).hidden_states[layer]
        got = tower(pv)
    torch.testing.assert_close(got, expected[:, dropped:], rtol=0, atol=1e-5)
    assert len(tower.blocks()) == {None: 2, -1: 3, 1: 1}[feature_layer]
    assert all(a is b for a, b in zip(tower.blocks(), tower.model.encoder.layer))


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers"])
def test_dinov2_drops_its_final_norm_and_mask_token(standins, kind):
    s = standins[kind]
    reference = _dinov2_reference(s.name_or_path)
    tower = _tower(s, feature_layer=-1, select="full")
    pv = _pixels(s.image_size, seed=4)
    with torch.no_grad():  # the model's own output is the final layernorm of the tower's features
        torch.testing.assert_close(
            reference.layernorm(tower(pv)),
            reference(pixel_values=pv).last_hidden_state,
            rtol=0,
            atol=1e-5,
        )
    names = [n for n, _ in tower.named_parameters()]
    assert not any(n.startswith("model.layernorm.") or n.endswith("mask_token") for n in names)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers"])
def test_dinov2_takes_its_processors_crop_size_and_normalisation(standins, kind):
    """Like facebook/dinov2-* (config 518 px, processor crop 224): the config says 48 px, the
    saved BitImageProcessor crops 32 px with ImageNet mean/std; the tower runs at 32."""
    from transformers import AutoConfig, AutoImageProcessor

    s = standins[kind]
    processor = AutoImageProcessor.from_pretrained(s.name_or_path)
    assert type(processor).__name__ == "BitImageProcessor"
    assert AutoConfig.from_pretrained(s.name_or_path).image_size == 48
    spec = _tower(s).image_spec
    assert spec.size == processor.crop_size["height"] == 32
    assert (spec.mean, spec.std) == (tuple(processor.image_mean), tuple(processor.image_std))
    assert spec.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "clip", "siglip"])
@pytest.mark.parametrize("size", [24, 48])
def test_hf_image_size_interpolates_position_embeddings(standins, kind, size):
    """model.vision.image_size: DINOv2 interpolates on its own; CLIP / SigLIP are asked to
    (interpolate_pos_encoding=True). Features equal transformers' at that input size."""
    s = standins[kind]
    reference = _dinov2_reference(s.name_or_path) if kind.startswith("dinov2") else None
    if reference is None:
        from transformers import CLIPVisionModel, SiglipVisionModel

        cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
        reference = cls.from_pretrained(s.name_or_path).eval()
    tower = _tower(s, image_size=size)
    prefix = {"dinov2": 1, "dinov2_registers": 5, "clip": 1, "siglip": 0}[kind]
    assert tower.num_tokens == (size // 8) ** 2 and tower.image_spec.size == size
    pv = _pixels(size, seed=2)
    extra = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        expected = reference(pixel_values=pv, output_hidden_states=True, **extra).hidden_states[-2]
        torch.testing.assert_close(tower(pv), expected[:, prefix:], rtol=0, atol=1e-5)


# -- open_clip ----------------------------------------------------------------------------------


def _open_clip_reference(path: str):
    import open_clip

    return open_clip.create_model(f"local-dir:{path}", require_pretrained=True).eval()


@pytest.mark.parametrize("feature_layer", [None, -1, 1])
@pytest.mark.parametrize("select", ["auto", "full"])
def test_open_clip_features_are_the_trunks_block_output(standins, feature_layer, select):
    s = standins["open_clip"]
    visual = _open_clip_reference(s.name_or_path).visual
    tower = _tower(s, feature_layer=feature_layer, select=select)
    assert tower.num_tokens == (s.image_size // 8) ** 2 + (1 if select == "full" else 0)
    pv = _pixels(s.image_size)
    keep = {None: 2, -1: 3, 1: 1}[feature_layer]
    assert visual.transformer.batch_first
    with torch.no_grad():
        x = visual._embeds(pv)  # conv patches, CLS, positions, ln_pre
        for block in visual.transformer.resblocks[:keep]:
            x = block(x)
        got = tower(pv)
    assert got.shape == (2, tower.num_tokens, s.hidden_size)
    torch.testing.assert_close(got, x if select == "full" else x[:, 1:], rtol=0, atol=1e-5)
    assert len(tower.blocks()) == keep


def test_open_clip_last_layer_matches_the_models_own_token_output(standins):
    """The model's own forward (tokens after ln_post) equals ln_post of the tower's last-layer features."""
    s = standins["open_clip"]
    visual = _open_clip_reference(s.name_or_path).visual
    visual.output_tokens = True
    tower = _tower(s, feature_layer=-1)
    pv = _pixels(s.image_size, seed=3)
    with torch.no_grad():
        _, tokens = visual(pv)
        torch.testing.assert_close(visual.ln_post(tower(pv)), tokens, rtol=0, atol=1e-5)
    # What follows the blocks is gone from the tower.
    names = [n for n, _ in tower.named_parameters()]
    assert not any("ln_post" in n or n.endswith("proj") for n in names)
    assert not any(n.startswith("text") or "token_embedding" in n for n in names)


# -- timm ---------------------------------------------------------------------------------------


def _timm_reference(path: str):
    import timm

    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


def _save_timm(tmp_path, arch: str, data_config=None, **kwargs):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    save_for_hf(model, str(tmp_path), safe_serialization=True, data_config=data_config)
    return str(tmp_path)


def _vit_blocks_by_hand(m, pv, keep):
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pv))))
    for block in m.blocks[:keep]:
        x = block(x)
    return x


@pytest.mark.parametrize("feature_layer", [None, -1, 1])
@pytest.mark.parametrize("select", ["auto", "patch", "full"])
def test_timm_vit_features_are_the_block_output(standins, feature_layer, select):
    s = standins["timm_vit"]
    ref = _timm_reference(s.name_or_path)
    assert ref.num_prefix_tokens == 1
    tower = _tower(s, feature_layer=feature_layer, select=select)
    dropped = {"auto": 1, "patch": 1, "full": 0}[select]
    assert tower.num_tokens == (s.image_size // 8) ** 2 + 1 - dropped
    keep = {None: 2, -1: 3, 1: 1}[feature_layer]
    pv = _pixels(s.image_size)
    with torch.no_grad():
        expected = _vit_blocks_by_hand(ref, pv, keep)[:, dropped:]
        got = tower(pv)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert len(tower.blocks()) == keep
    assert all(a is b for a, b in zip(tower.blocks(), tower.model.blocks))


def test_timm_vit_last_layer_matches_forward_features(standins):
    s = standins["timm_vit"]
    ref = _timm_reference(s.name_or_path)
    tower = _tower(s, feature_layer=-1)
    pv = _pixels(s.image_size, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            ref.norm(tower(pv)), ref.forward_features(pv)[:, 1:], rtol=0, atol=1e-5
        )
    names = [n for n, _ in tower.named_parameters()]
    assert not any(n.startswith(("model.norm.", "model.head.", "model.fc_norm.")) for n in names)


@pytest.mark.parametrize("kind, prefix", [("timm_dinov2", 1), ("timm_dinov2_reg4", 5)])
def test_timm_dinov2_features_are_prismatics_featurizer_output(standins, kind, prefix):
    """Prismatic's DINOv2 featurizer (dinosiglip_vit.py / dinov2_vit.py) is timm's
    ``get_intermediate_layers(x, n={len(blocks) - 2})``: second-to-last block, patch tokens
    only, no final norm. lmm's default (feature_layer -2, select auto) is the same tensor."""
    s = standins[kind]
    ref = _timm_reference(s.name_or_path)
    assert ref.num_prefix_tokens == prefix
    tower = _tower(s)
    assert tower.num_tokens == (s.image_size // 8) ** 2
    pv = _pixels(s.image_size)
    with torch.no_grad():
        (expected,) = ref.get_intermediate_layers(pv, n={len(ref.blocks) - 2})
        torch.testing.assert_close(tower(pv), expected, rtol=0, atol=1e-5)
    full = _tower(s, select="full")
    assert full.num_tokens == (s.image_size // 8) ** 2 + prefix


@pytest.mark.parametrize("kind", ["timm_dinov2_reg4", "timm_siglip", "timm_vit"])
def test_timm_image_size_is_timms_own_img_size(standins, kind):
    """model.vision.image_size=48 gives what ``timm.create_model(..., img_size=48)`` gives (the
    way Prismatic builds its 384 px towers from 518 px checkpoints): 6x6 patches."""
    import timm

    s = standins[kind]
    ref = timm.create_model(f"local-dir:{s.name_or_path}", pretrained=True, img_size=48).eval()
    tower = _tower(s, image_size=48)
    assert tower.num_tokens == 36 and tower.image_spec.size == 48
    pv = _pixels(48)
    with torch.no_grad():
        (expected,) = ref.get_intermediate_layers(pv, n={len(ref.blocks) - 2})
        torch.testing.assert_close(tower(pv), expected, rtol=0, atol=1e-5)


def test_image_size_on_a_cnn_and_on_open_clip(standins):
    cnn = _tower(standins["timm_cnn"], image_size=96)
    assert cnn.image_spec.size == 96 and cnn.num_tokens == (96 // 32) ** 2
    with pytest.raises(ConfigError, match="model.vision.image_size=48: kind 'open_clip'"):
        _tower(standins["open_clip"], image_size=48)


def test_timm_vit_with_registers_drops_every_prefix_token(tmp_path):
    path = _save_timm(
        tmp_path,
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        reg_tokens=2,
    )
    ref = _timm_reference(path)
    assert ref.num_prefix_tokens == 3  # CLS + 2 registers
    pv = _pixels(32)
    with torch.no_grad():
        full = _vit_blocks_by_hand(ref, pv, 1)
        for select, dropped in [("auto", 3), ("patch", 1), ("full", 0)]:
            tower = build_vision_tower(
                VisionConfig(kind="timm", name_or_path=path, select=select)
            ).eval()
            assert tower.num_tokens == 16 + 3 - dropped
            torch.testing.assert_close(tower(pv), full[:, dropped:], rtol=0, atol=1e-5)


def _resnet_by_hand(m, pv, stages):
    x = m.maxpool(m.act1(m.bn1(m.conv1(pv))))
    for name in ("layer1", "layer2", "layer3", "layer4")[:stages]:
        x = getattr(m, name)(x)
    return x


@pytest.mark.parametrize(
    "feature_layer, stages, stride", [(None, 4, 32), (-1, 4, 32), (-2, 3, 16), (1, 1, 4)]
)
def test_timm_cnn_tokens_are_the_stage_map_cells(standins, feature_layer, stages, stride):
    s = standins["timm_cnn"]
    ref = _timm_reference(s.name_or_path)
    tower = _tower(s, feature_layer=feature_layer)
    side = s.image_size // stride
    assert tower.num_tokens == side * side
    assert tower.hidden_size == ref.feature_info[stages]["num_chs"]
    pv = _pixels(s.image_size)
    with torch.no_grad():
        fmap = _resnet_by_hand(ref, pv, stages)  # [B, C, h, w]
        got = tower(pv)
    assert fmap.shape[-2:] == (side, side)
    assert got.shape == (2, side * side, fmap.shape[1])
    # Token i*w + j is cell (i, j) of the map (row-major).
    for i, j in [(0, 0), (0, side - 1), (side - 1, 0)]:
        torch.testing.assert_close(got[:, i * side + j], fmap[:, :, i, j], rtol=0, atol=1e-5)
    torch.testing.assert_close(got, fmap.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
    assert [b for b in tower.blocks()] == [
        getattr(tower.model, f"layer{i}") for i in range(1, stages + 1)
    ]
    if stages == 4:  # the final map is the model's own forward_features
        torch.testing.assert_close(
            got, ref.forward_features(pv).flatten(2).transpose(1, 2), rtol=0, atol=1e-5
        )


def test_timm_convnext_blocks_are_its_stages(tmp_path):
    path = _save_timm(
        tmp_path,
        "convnext_atto",
        data_config={"input_size": (3, 64, 64)},
        depths=(1, 1, 1, 1),
        dims=(8, 16, 24, 32),
    )
    ref = _timm_reference(path)
    tower = build_vision_tower(
        VisionConfig(kind="timm", name_or_path=path, feature_layer=-2)
    ).eval()
    assert (
        len(tower.blocks()) == 3 and tower.num_tokens == (64 // 16) ** 2 and tower.hidden_size == 24
    )
    assert all(a is b for a, b in zip(tower.blocks(), tower.model.stages))
    pv = _pixels(64)
    with torch.no_grad():
        x = ref.stem(pv)
        for stage in ref.stages[:3]:
            x = stage(x)
        torch.testing.assert_close(tower(pv), x.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
    assert tower.image_spec.size == 64


def test_cnn_has_no_first_token_to_drop(standins):
    with pytest.raises(ConfigError, match="select='patch'.*use auto"):
        _tower(standins["timm_cnn"], select="patch")


# -- blocks and partial freezing, every kind ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_partial_freezing_freezes_embedding_and_blocks_before_k(standins, kind):
    s = standins[kind]
    tower = _tower(s, feature_layer=-1).train()
    blocks = tower.blocks()
    assert len(blocks) == s.num_blocks
    names = {id(p): n for n, p in tower.named_parameters()}
    in_blocks = {names[id(p)] for p in blocks.parameters()}
    outside = set(names.values()) - in_blocks
    assert outside, "the patch embedding / stem must exist outside the blocks"
    pv = _pixels(s.image_size)
    for k in range(len(blocks) + 1):
        apply_policy(tower, "partial", tower.blocks(), k, "model.freeze.vision")
        trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
        assert trainable == {names[id(p)] for b in list(blocks)[k:] for p in b.parameters()}, k
        assert not trainable & outside
        # The gradients agree: exactly the trainable parameters receive one.
        tower.zero_grad(set_to_none=True)
        if trainable:
            tower(pv).pow(2).mean().backward()
        got_grad = {
            n for n, p in tower.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        assert got_grad == trainable, k


def test_frozen_batchnorm_keeps_its_statistics(standins):
    """A frozen CNN stage's BatchNorm stays in eval mode when the tower trains: its pretrained
    running statistics are not overwritten by training batches."""
    tower = _tower(standins["timm_cnn"])
    apply_policy(tower, "partial", tower.blocks(), 2, "model.freeze.vision")
    tower.train()
    frozen_bn, trained_bn = tower.model.layer1[0].bn1, tower.model.layer3[0].bn1
    assert not frozen_bn.training and not tower.model.bn1.training and trained_bn.training
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    tower(_pixels(standins["timm_cnn"].image_size, n=4, seed=7))
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(trained_bn.running_mean, before[1])
    apply_policy(tower, "full", tower.blocks(), 0, "model.freeze.vision")
    assert tower.train().model.layer1[0].bn1.training


# -- options and image specs --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feature_layer", [0, 99, -99])
def test_feature_layer_out_of_range(standins, kind, feature_layer):
    with pytest.raises(ConfigError) as info:
        _tower(standins[kind], feature_layer=feature_layer)
    n = standins[kind].num_blocks
    assert f"model.vision.feature_layer={feature_layer}" in str(info.value)
    assert f"[-{n}, -1] or [1, {n}]" in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_image_preprocess_choice_reaches_the_transform(standins, kind):
    s = standins[kind]
    tower = _tower(s, image_preprocess="letterbox")
    assert tower.image_spec.preprocess == "letterbox"
    from PIL import Image

    wide = Image.new("RGB", (s.image_size, s.image_size // 2), (250, 250, 250))
    x = ImageTransform(tower.image_spec)(wide)
    assert x.shape == (3, s.image_size, s.image_size)
    # The letterbox rows are the tower's mean colour: ~0 after its own normalisation.
    assert x[:, : s.image_size // 4].abs().max() < 1 / 255 / min(
        s.std
    )  # the mean truncated to 8 bits, int(mean * 255), as LLaVA pads
    assert x[:, s.image_size // 2].abs().min() > 0.5
    nearest = _tower(s, image_preprocess="letterbox", fill_rounding="nearest").image_spec
    x = ImageTransform(nearest)(wide)
    assert x[:, : s.image_size // 4].abs().max() <= 0.5 / 255 / min(s.std) + 1e-6  # rounded
    with pytest.raises(ConfigError, match="square, pad, crop, resize, letterbox"):
        _tower(s, image_preprocess="squash")


@pytest.mark.parametrize("kind", KINDS)
def test_square_is_the_processor_of_transformers_towers_and_refused_elsewhere(standins, kind):
    s = standins[kind]
    # The stand-ins' processors: CLIPImageProcessor (shortest edge to the input size, centre
    # crop), SiglipImageProcessor (squash), DINOv2's BitImageProcessor (shortest edge to 36 px,
    # centre crop 32, as facebook/dinov2-*'s 256 -> 224).
    natives = {"clip": ("crop", s.image_size), "siglip": ("resize", None)}
    natives |= {"dinov2": ("crop", 36), "dinov2_registers": ("crop", 36)}
    if kind in natives:
        spec = _tower(s, image_preprocess="square").image_spec
        assert (spec.mode, spec.crop_from) == natives[kind]
    else:
        with pytest.raises(ConfigError, match="image_preprocess=square"):
            _tower(s, image_preprocess="square")
        assert _tower(s, image_preprocess="crop").image_spec.mode == "crop"


# -- missing weights ----------------------------------------------------------------------------

# What stays in a directory whose weights were not downloaded.
_CONFIG_ONLY = {
    "clip": ["config.json", "preprocessor_config.json"],
    "siglip": ["config.json", "preprocessor_config.json"],
    "open_clip": ["open_clip_config.json"],
    "timm_vit": ["config.json"],
    "timm_cnn": ["config.json"],
    "dinov2": ["config.json", "preprocessor_config.json"],
    "dinov2_registers": ["config.json", "preprocessor_config.json"],
    "timm_dinov2": ["config.json"],
    "timm_dinov2_reg4": ["config.json"],
    "timm_siglip": ["config.json"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_directory_without_weights_names_the_path_and_the_fix(standins, kind, tmp_path):
    s = standins[kind]
    for name in _CONFIG_ONLY[kind]:
        shutil.copy(f"{s.name_or_path}/{name}", tmp_path / name)
    with pytest.raises(MissingWeightsError) as info:
        build_vision_tower(VisionConfig(kind=s.kind, name_or_path=str(tmp_path)))
    msg = str(info.value)
    assert str(tmp_path) in msg and "model.vision.name_or_path" in msg
    assert "does not hold a loadable" in msg
    expected = {
        "hf": "model.safetensors",
        "open_clip": "open_clip_model.safetensors",
        "timm": "model.safetensors",
    }
    assert expected[s.kind] in msg


@pytest.mark.parametrize("kind", ["hf", "open_clip", "timm"])
def test_missing_directory_and_offline_hub_name(tmp_path, kind):
    missing = str(tmp_path / "not_here")
    with pytest.raises(MissingWeightsError, match="no such directory") as info:
        build_vision_tower(VisionConfig(kind=kind, name_or_path=missing))
    assert missing in str(info.value)
    hub = {
        "hf": "lmm-test/no-such-tower",
        "open_clip": "hf-hub:lmm-test/no-such-tower",
        "timm": "hf-hub:lmm-test/no-such-tower",
    }[kind]
    with pytest.raises(MissingWeightsError) as info:
        build_vision_tower(VisionConfig(kind=kind, name_or_path=hub))
    msg = str(info.value)
    assert "hf download lmm-test/no-such-tower --local-dir DIR" in msg
    assert "model.vision.name_or_path: DIR" in msg


def test_bare_names_without_weights():
    # A timm registry name resolves to timm's hub repo, unreachable offline.
    with pytest.raises(
        MissingWeightsError, match="hf download timm/vit_tiny_patch16_224.augreg_in21k"
    ):
        build_vision_tower(
            VisionConfig(kind="timm", name_or_path="vit_tiny_patch16_224.augreg_in21k")
        )
    # An open_clip architecture name alone would be random weights: refused with what to write.
    with pytest.raises(
        MissingWeightsError, match="bare open_clip architecture name carries no weights"
    ) as info:
        build_vision_tower(VisionConfig(kind="open_clip", name_or_path="ViT-B-32"))
    assert "hf-hub:ORG/REPO" in str(info.value)


def test_open_clip_config_without_vision_transformer_is_refused(standins, tmp_path):
    """An open_clip model whose image tower is not open_clip's ViT (here a ModifiedResNet) is refused."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    model = open_clip.CLIP(**cfg)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "open_clip_model.safetensors"),
    )
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(
        ConfigError, match="ModifiedResNet.*kind 'open_clip' supports open_clip's VisionTransformer"
    ):
        build_vision_tower(VisionConfig(kind="open_clip", name_or_path=str(tmp_path)))


def test_tower_defaults_are_documented_defaults():
    cfg = VisionConfig()
    assert (cfg.kind, cfg.feature_layer, cfg.select, cfg.image_preprocess) == (
        "hf",
        None,
        "auto",
        "pad",
    )
    with pytest.raises(ConfigError, match="model.vision.select.*auto, patch, full"):
        build_vision_tower(VisionConfig(select="cls"))
