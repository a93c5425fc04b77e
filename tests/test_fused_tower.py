"""Fused towers (``model.vision.kind: fused``): each tower gets exactly its own view of the
image, the joined features are the towers' own hidden states (Prismatic's channel concat,
TinyLLaVA's MoF interleave), freeze policies / LoRA / FSDP units reach every tower, and the
options that cannot work stop with an error naming them.

Towers are the tiny random-init stand-ins of the real classes (``lmm.standins.vision``); the
references are transformers' and timm's own models called directly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lmm.data.image import ImageTransform
from lmm.errors import ConfigError, MissingWeightsError
from lmm.model.towers import VisionConfig, build_vision_tower
from lmm.model.towers.fused_config import FusedConfig, SubTowerConfig
from lmm.standins.vision import build_tower

KINDS = ("clip", "siglip", "dinov2", "timm_dinov2_reg4", "timm_siglip")


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_towers")
    return {kind: build_tower(kind, out) for kind in KINDS}


def _sub(standin, **overrides) -> SubTowerConfig:
    return SubTowerConfig(kind=standin.kind, name_or_path=standin.name_or_path, **overrides)


def _fused(subs, join="concat", **vision) -> VisionConfig:
    return VisionConfig(kind="fused", fused=FusedConfig(towers=list(subs), join=join), **vision)


def _pixels(channels: int, size: int = 32, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _hf_hidden(path: str, pv: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """transformers' own model: the hidden state at ``layer``, its CLS dropped."""
    from transformers import AutoConfig, CLIPVisionModel, Dinov2Model

    cls = (
        Dinov2Model if AutoConfig.from_pretrained(path).model_type == "dinov2" else CLIPVisionModel
    )
    model = cls.from_pretrained(path).eval()
    return model(pixel_values=pv, output_hidden_states=True).hidden_states[layer][:, 1:]


def _save_dinov2(path, width: int, patch: int) -> None:
    """A 2-layer random Dinov2Model for 32 px images, without a processor config."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=32,
        patch_size=patch,
    )
    Dinov2Model(cfg).save_pretrained(path)


def _timm_patches(path: str, pv: torch.Tensor) -> torch.Tensor:
    """timm's own model as Prismatic calls it: second-to-last block, patch tokens only."""
    import timm

    model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    return model.get_intermediate_layers(pv, n={len(model.blocks) - 2})[0]


# -- each tower sees exactly its own view -----------------------------------------------------


@pytest.mark.parametrize("preprocess", ["pad", "letterbox", "resize"])
def test_each_view_is_what_the_tower_alone_is_given(standins, preprocess):
    """The stacked input's channels 3k..3k+2 equal tower k's own ImageTransform, bit for bit:
    its mean/std and its padding colour (a padded border is ~0 in every view)."""
    subs = [_sub(standins["clip"]), _sub(standins["dinov2"]), _sub(standins["siglip"])]
    fused = build_vision_tower(_fused(subs, image_preprocess=preprocess))
    alone = [
        build_vision_tower(
            VisionConfig(kind=s.kind, name_or_path=s.name_or_path, image_preprocess=preprocess)
        )
        for s in subs
    ]
    assert fused.image_spec.channels == 9
    wide = Image.new("RGBA", (40, 18), (250, 30, 90, 255))
    wide.putpixel((3, 3), (0, 0, 0, 0))  # a transparent pixel: composited over each view's fill
    x = ImageTransform(fused.image_spec)(wide)
    assert x.shape == (9, 32, 32)
    for k, tower in enumerate(alone):
        assert torch.equal(x[3 * k : 3 * k + 3], ImageTransform(tower.image_spec)(wide)), k
        if preprocess != "resize":  # the top rows are padding: the tower's own mean colour
            # int(mean * 255), as LLaVA and Prismatic pad: within one 8-bit level of the mean
            assert x[3 * k : 3 * k + 3, :4].abs().max() < 1 / 255 / min(tower.image_spec.std), k
    assert torch.equal(ImageTransform(fused.image_spec).blank(), torch.zeros(9, 32, 32))


# -- token counts and features ------------------------------------------------------------------


def test_concat_is_both_towers_hidden_states_side_by_side(standins):
    """Prismatic's DINO-SigLIP: cat([dino(x_dino), siglip(x_siglip)], dim=2) of each timm
    featurizer's second-to-last block; N tokens, width D1 + D2."""
    dino, siglip = standins["timm_dinov2_reg4"], standins["timm_siglip"]
    tower = build_vision_tower(_fused([_sub(dino), _sub(siglip)])).eval()
    assert (tower.num_tokens, tower.hidden_size, tower.token_groups) == (16, 64, 1)
    pv = _pixels(6)
    with torch.no_grad():
        expected = torch.cat(
            [
                _timm_patches(dino.name_or_path, pv[:, :3]),
                _timm_patches(siglip.name_or_path, pv[:, 3:]),
            ],
            dim=-1,
        )
        assert torch.equal(tower(pv), expected)


def test_interleave_alternates_the_towers_tokens(standins):
    """TinyLLaVA's MoF (CLIP + DINOv2): token 2i is CLIP's patch i, token 2i+1 DINOv2's patch i,
    each the model's own hidden_states[-2] without CLS; 2N tokens of width D."""
    clip, dino = standins["clip"], standins["dinov2"]
    tower = build_vision_tower(_fused([_sub(clip), _sub(dino)], join="interleave")).eval()
    assert (tower.num_tokens, tower.hidden_size, tower.token_groups) == (32, 32, 2)
    pv = _pixels(6, seed=1)
    with torch.no_grad():
        got = tower(pv)
        assert torch.equal(got[:, 0::2], _hf_hidden(clip.name_or_path, pv[:, :3]))
        assert torch.equal(got[:, 1::2], _hf_hidden(dino.name_or_path, pv[:, 3:]))


def test_concat_resizes_a_coarser_grid_to_the_first_towers(standins, tmp_path):
    """A 16 px-patch DINOv2 (2x2 grid) next to CLIP (4x4): its grid is resized bilinearly
    (align_corners=False) to 4x4, token count stays CLIP's."""
    _save_dinov2(tmp_path, width=16, patch=16)
    clip = standins["clip"]
    # No processor config: BitImageProcessor's 224 px would be its size; take CLIP's 32.
    coarse = SubTowerConfig(kind="hf", name_or_path=str(tmp_path), image_size=32)
    tower = build_vision_tower(_fused([_sub(clip), coarse])).eval()
    assert (tower.num_tokens, tower.hidden_size) == (16, 48)
    pv = _pixels(6, seed=2)
    with torch.no_grad():
        dino = _hf_hidden(str(tmp_path), pv[:, 3:])  # [2, 4, 16]: a 2x2 grid
        grid = dino.transpose(1, 2).reshape(2, 16, 2, 2)
        resized = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
        got = tower(pv)
        assert torch.equal(got[..., :32], _hf_hidden(clip.name_or_path, pv[:, :3]))
        torch.testing.assert_close(
            got[..., 32:], resized.flatten(2).transpose(1, 2), rtol=0, atol=1e-6
        )


def test_sub_towers_take_their_own_feature_layer_and_select(standins):
    clip, dino = standins["clip"], standins["dinov2"]
    tower = build_vision_tower(
        _fused([_sub(clip, feature_layer=1), _sub(dino, feature_layer=-1)])
    ).eval()
    assert (tower.num_tokens, len(tower.blocks())) == (16, 1 + 3)
    pv = _pixels(6, seed=3)
    with torch.no_grad():
        got = tower(pv)
        assert torch.equal(got[..., :32], _hf_hidden(clip.name_or_path, pv[:, :3], layer=1))
        assert torch.equal(got[..., 32:], _hf_hidden(dino.name_or_path, pv[:, 3:], layer=-1))
    # DINOv2 with its CLS kept (select: full) gives 17 tokens: no grid to resize to CLIP's.
    with pytest.raises(ConfigError, match=r"towers\[1\]'s 17 tokens are no square grid"):
        build_vision_tower(_fused([_sub(clip), _sub(dino, select="full")]))


# -- freezing, LoRA, FSDP units ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mof_model(standins, tiny_models):
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM

    vision = _fused(
        [_sub(standins["clip"], feature_layer=-1), _sub(standins["dinov2"], feature_layer=-1)],
        "interleave",
    )
    return LMM(vision, LanguageConfig(name_or_path=str(tiny_models["llm"])), "mof_mlp")


def _names(module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in module.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("policy", ["full", "frozen", "partial", "lora"])
def test_freeze_policies_apply_to_each_tower(mof_model, policy):
    """``partial`` from block 1 freezes each tower's embeddings and block 0, ``lora`` adapts the
    blocks of both towers; a backward step gives gradients to exactly the trainable ones."""
    from lmm.model.freeze import FreezeConfig

    model = mof_model
    clip, dino = model.vision.sub_towers()
    assert len(clip.blocks()) == len(dino.blocks()) == 3
    model.apply_freeze(
        FreezeConfig(vision=policy, vision_from_layer=1, connector="frozen", llm="frozen")
    )
    vision = model.vision
    trainable = {n for n, p in vision.named_parameters() if p.requires_grad}
    every = {n for n, _ in vision.named_parameters()}
    if policy == "full":
        assert trainable == every
    elif policy == "frozen":
        assert trainable == set()
    elif policy == "partial":
        later = [p for t in (clip, dino) for b in list(t.blocks())[1:] for p in b.parameters()]
        assert trainable == _names(vision, later)
        assert any(n.startswith("towers.0.") for n in trainable) and any(
            n.startswith("towers.1.") for n in trainable
        )
    else:
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        for t in (clip, dino):  # no linear layer inside either tower's blocks is left unadapted
            linears = [
                n
                for b in t.blocks()
                for n, m in b.named_modules()
                if isinstance(m, torch.nn.Linear)
            ]
            assert any(n.endswith(".base_layer") for n in linears)
            assert all(
                n.endswith((".base_layer", ".lora_A.default", ".lora_B.default")) for n in linears
            )
    vision.zero_grad(set_to_none=True)
    if trainable:
        vision(_pixels(6, seed=4)).pow(2).mean().backward()
        lora_b_zero = policy == "lora"  # B starts at zero: A gets no gradient on the first step
        got = {
            n for n, p in vision.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        expected = {n for n in trainable if not (lora_b_zero and ".lora_A." in n)}
        assert got == expected
    if policy == "lora":
        from lmm.model.lora import merge_lora

        merge_lora(vision)  # leave the shared model plain for the next case


def test_fsdp_and_checkpointing_units_are_every_towers_blocks(mof_model):
    from lmm.model.efficiency import is_block

    vision = mof_model.vision
    marked = [m for m in vision.modules() if is_block(m)]
    blocks = [b for t in vision.sub_towers() for b in t.blocks()]
    assert len(marked) == 6 and {id(m) for m in marked} == {id(b) for b in blocks}
    assert [id(b) for b in vision.blocks()] == [id(b) for b in blocks]


# -- options that cannot work ---------------------------------------------------------------------


def test_fused_errors_name_the_option(standins):
    from lmm.visual.anyres import AnyResConfig
    from lmm.visual.video import VideoConfig

    clip, dino, siglip = standins["clip"], standins["dinov2"], standins["siglip"]
    pair = [_sub(clip), _sub(dino)]
    cases = [
        (VisionConfig(kind="fused"), "model.vision.kind=fused needs model.vision.fused"),
        (
            VisionConfig(kind="hf", fused=FusedConfig(towers=pair)),
            "model.vision.fused is set but model.vision.kind",
        ),
        (
            _fused(pair, name_or_path="x"),
            r"model.vision.name_or_path does not apply to kind fused.*towers\[i\]",
        ),
        (_fused(pair[:1]), "needs at least two towers"),
        (
            _fused([_sub(clip), SubTowerConfig(kind="fused", name_or_path="x")]),
            r"towers\[1\].kind=fused",
        ),
        (_fused([_sub(clip), SubTowerConfig(kind="hf")]), r"towers\[1\].name_or_path is empty"),
        (_fused([_sub(clip), _sub(dino, image_size=48)]), "images of 32 px, 48 px"),
        (_fused(pair, anyres=AnyResConfig()), "model.vision.anyres does not work with kind fused"),
        (_fused(pair, "interleave", video=VideoConfig()), "model.vision.video .*join: concat"),
        (_fused([_sub(clip), _sub(dino, image_size=48)], "interleave"), "images of 32 px, 48 px"),
        (
            _fused([_sub(clip), _sub(dino, feature_layer=9)]),
            r"model.vision.fused.towers\[1\].feature_layer=9",
        ),
        (
            _fused([_sub(clip), SubTowerConfig(kind="timm_vit", name_or_path="x")]),
            r"model.vision.fused.towers\[1\].kind: unknown",
        ),
        (
            _fused(pair, image_preprocess="squash"),
            "model.vision.image_preprocess: unknown mode 'squash'",
        ),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_vision_tower(cfg)
    with pytest.raises(MissingWeightsError, match=r"model.vision.fused.towers\[1\].name_or_path"):
        build_vision_tower(
            _fused([_sub(clip), SubTowerConfig(kind="hf", name_or_path="/no/such/dir")])
        )
    tower = build_vision_tower(
        _fused([_sub(clip), _sub(siglip)], "interleave")
    )  # equal widths: fine
    with pytest.raises(ValueError, match="it takes 6"):
        tower(_pixels(3))


def test_interleave_needs_equal_widths(standins, tmp_path):
    _save_dinov2(tmp_path, width=16, patch=8)
    narrow = SubTowerConfig(kind="hf", name_or_path=str(tmp_path), image_size=32)
    with pytest.raises(
        ConfigError, match=r"join=interleave needs .* 16 tokens x 32, 16 tokens x 16"
    ):
        build_vision_tower(_fused([_sub(standins["clip"]), narrow], "interleave"))


def test_video_works_with_concat(standins, tiny_models):
    """Frames are prepared per tower like images; the concat grid pools like a single tower's."""
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM
    from lmm.visual.video import VideoConfig

    vision = _fused(
        [_sub(standins["clip"]), _sub(standins["siglip"])], video=VideoConfig(max_frames=2, pool=2)
    )
    model = LMM(vision, LanguageConfig(name_or_path=str(tiny_models["llm"])), "fused_gelu_mlp")
    assert model.image_layout is not None and model.image_layout.unit == 4


# -- checkpoint directories ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["dinov2_registers", "mof"])
def test_dinov2_and_fused_towers_survive_a_checkpoint_directory(
    standins, tiny_models, tmp_path, which
):
    """An hf DINOv2 tower is saved as a transformers model (its removed layernorm and mask token
    written back as placeholders); a fused tower's weights go to the weights file. Reloaded,
    both give the same image embeddings."""
    from lmm.checkpoints.directory import load_checkpoint_dir, save_checkpoint_dir
    from lmm.data.templates import get_template
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM

    llm = LanguageConfig(name_or_path=str(tiny_models["llm"]))
    if which == "mof":
        vision, connector = (
            _fused([_sub(standins["clip"]), _sub(standins["dinov2"])], "interleave"),
            "mof_mlp",
        )
    else:
        reg = build_tower("dinov2_registers", tmp_path / "towers")
        vision, connector = VisionConfig(kind="hf", name_or_path=reg.name_or_path), "mlp2x_gelu"
    model = LMM(vision, llm, connector).eval()
    with torch.no_grad():  # trained weights differ from the source: the directory must hold them
        for p in model.vision.parameters():
            p.add_(0.01)
    out = save_checkpoint_dir(
        model, tmp_path / "ckpt", vision=vision, llm=llm, connector=connector, template=get_template("vicuna"),
        max_length=64,
    )  # fmt: skip
    loaded = load_checkpoint_dir(out).model
    pv = _pixels(model.vision.image_spec.channels, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_images(pv), model.encode_images(pv), rtol=0, atol=1e-6
        )
    # The images are prepared the same (the saved processor holds the preparation, not the
    # tower's own processor geometry: `native` is not part of what a checkpoint keeps).
    ours, theirs = loaded.vision.image_spec, model.vision.image_spec
    assert (ours.mode, ours.size, ours.mean, ours.std, ours.fill) == (
        theirs.mode, theirs.size, theirs.mean, theirs.std, theirs.fill
    )  # fmt: skip
    wide = Image.new("RGB", (50, 20), (250, 30, 90))
    assert torch.equal(ImageTransform(ours)(wide), ImageTransform(theirs)(wide))
