"""Connectors: shapes, token counts, registry errors, pooling against a hand computation."""

import pytest
import torch

from lmm.errors import ConfigError, UnknownComponentError
from lmm.model.connectors import CONNECTORS, ConnectorConfig, build_connector
from lmm.model.connectors.pixel_shuffle import PixelShuffleMLP
from lmm.model.connectors.resampler import Resampler


@pytest.mark.parametrize("name,depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_mlp_connectors_keep_tokens_and_depth(name, depth):
    c = build_connector(name, 8, 12, 16)
    assert c.num_output_tokens == 16
    assert c(torch.randn(2, 16, 8)).shape == (2, 16, 12)
    assert sum(isinstance(m, torch.nn.Linear) for m in c.modules()) == depth


def test_pool_connector_averages_each_2x2_cell():
    c = build_connector("pool2x2_mlp2x_gelu", 3, 5, 16)
    assert c.num_output_tokens == 4
    x = torch.randn(2, 16, 3)
    grid = x.view(2, 4, 4, 3)  # tokens are row-major over the 4x4 patch grid
    # Cell (r, c) of the 2x2 output averages patches (2r..2r+1, 2c..2c+1), in row-major order.
    expected = torch.stack(
        [
            grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(1, 2))
            for r in range(2)
            for c in range(2)
        ],
        dim=1,
    )
    assert torch.allclose(c(x), c.layers(expected), atol=1e-6)


def test_pool_connector_rejects_grids_it_cannot_pool():
    with pytest.raises(ConfigError, match="square grid"):
        build_connector("pool2x2_mlp2x_gelu", 3, 5, 15)
    with pytest.raises(ConfigError, match="divides by 2"):
        build_connector("pool2x2_mlp2x_gelu", 3, 5, 9)


def test_identity_needs_equal_widths():
    assert build_connector("identity", 4, 4, 9).num_output_tokens == 9
    with pytest.raises(ConfigError, match="equal widths"):
        build_connector("identity", 4, 5, 9)


def test_unknown_connector_lists_known_names_and_matches_exactly():
    with pytest.raises(UnknownComponentError) as err:
        build_connector("mlp2x", 4, 4, 9)  # a prefix of a real name is still unknown
    assert "model.connector" in str(err.value)
    for name in CONNECTORS.names():
        assert name in str(err.value)


# -- connectors with options ---------------------------------------------------------------------


def test_pixel_shuffle_concatenates_each_rxr_block_before_the_mlp():
    c = build_connector(ConnectorConfig(name="pixel_shuffle", factor=2, mlp_depth=1), 3, 5, 16)
    assert c.num_output_tokens == 4
    x = torch.randn(2, 16, 3)
    grid = x.view(2, 4, 4, 3)  # row-major 4x4 patch grid
    # Output token (i, j) concatenates patches (2i+a, 2j+b) for (a, b) in row-major order.
    expected = torch.stack(
        [torch.cat([grid[:, 2 * i + a, 2 * j + b] for a in range(2) for b in range(2)], dim=-1)
         for i in range(2) for j in range(2)],
        dim=1,
    )  # fmt: skip
    assert expected.shape == (2, 4, 12)
    assert torch.allclose(c(x), c.layers(expected), atol=1e-6)
    assert sum(isinstance(m, torch.nn.Linear) for m in c.modules()) == 1


def test_pixel_shuffle_factor_3_on_a_siglip_384_grid():
    # SigLIP-so400m/384 gives 27x27 = 729 tokens: factor 3 works, factor 2 cannot.
    c = build_connector({"name": "pixel_shuffle", "factor": 3}, 4, 6, 729)
    assert c.num_output_tokens == 81 and c(torch.randn(1, 729, 4)).shape == (1, 81, 6)
    with pytest.raises(ConfigError) as err:
        build_connector(ConnectorConfig(name="pixel_shuffle", factor=2), 4, 6, 729)
    assert "factor 2 does not divide the 27x27 token grid" in str(err.value) and "3, 9, 27" in str(
        err.value
    )
    with pytest.raises(ConfigError, match="square grid"):
        build_connector(
            ConnectorConfig(name="pixel_shuffle"), 4, 6, 577
        )  # CLIP-L/336 with its CLS token


def test_resampler_gives_num_queries_tokens_for_any_token_count():
    torch.manual_seed(0)
    c = build_connector(
        ConnectorConfig(name="resampler", num_queries=5, depth=2, heads=2), 8, 12, 16
    )
    assert c.num_output_tokens == 5
    assert len(c.blocks) == 2 and c.blocks[0].attn.num_heads == 2
    for n in (16, 7, 50):  # not tied to the tower's grid
        assert c(torch.randn(3, n, 8)).shape == (3, 5, 12)


def test_resampler_reads_the_image_and_ignores_token_order():
    torch.manual_seed(0)
    c = build_connector(ConnectorConfig(name="resampler", num_queries=4, heads=4), 8, 6, 9).eval()
    x = torch.randn(2, 9, 8)
    out = c(x)
    # Cross-attention without positions: permuting the vision tokens changes nothing...
    assert torch.allclose(c(x[:, torch.randperm(9)]), out, atol=1e-5)
    # ...but the content does, and each image gets its own tokens.
    assert not torch.allclose(c(torch.randn(2, 9, 8)), out, atol=1e-3)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    out.sum().backward()
    assert c.queries.grad is not None and c.queries.grad.abs().sum() > 0


def test_resampler_heads_must_divide_the_tower_width():
    with pytest.raises(ConfigError, match=r"model.connector.heads=3 must divide the tower width 8"):
        build_connector(ConnectorConfig(name="resampler", heads=3), 8, 12, 16)


def test_options_a_connector_does_not_read_are_errors():
    with pytest.raises(ConfigError) as err:
        build_connector(ConnectorConfig(name="mlp2x_gelu", num_queries=16), 8, 12, 16)
    assert "model.connector.num_queries does not apply to connector 'mlp2x_gelu'" in str(err.value)
    with pytest.raises(
        ConfigError,
        match=r"model.connector.factor does not apply to connector 'resampler' "
        r"\(it reads: num_queries, depth, heads\)",
    ):
        build_connector(ConnectorConfig(name="resampler", factor=3), 8, 12, 16)
    # Defaults of other connectors' options are fine.
    assert build_connector(ConnectorConfig(name="linear"), 8, 12, 16).num_output_tokens == 16


def test_unknown_name_in_a_config_names_the_field():
    with pytest.raises(UnknownComponentError) as err:
        build_connector(ConnectorConfig(name="resampler2"), 4, 4, 9)
    assert "model.connector.name: unknown connector 'resampler2'; known: " in str(err.value)
    assert "pixel_shuffle" in str(err.value) and "resampler" in str(err.value)


def test_connector_options_from_yaml_reach_the_model(tiny_models, tmp_path):
    """A bare name and a name with options both work from YAML and the command line."""
    from lmm.train.cli import LMMCLI

    common = [
        "--model.vision.name_or_path", str(tiny_models["vision"]), "--model.vision.feature_layer", "-1",
        "--model.llm.name_or_path", str(tiny_models["llm"]), "--trainer.logger", "false",
    ]  # fmt: skip
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  connector:\n    name: resampler\n    num_queries: 6\n    heads: 4\n")
    cli = LMMCLI(args=common + ["--config", str(cfg)], run=False)
    m = cli.model.model
    assert (
        isinstance(m.connector, Resampler)
        and m.num_image_tokens == 6
        and m.connector.blocks[0].attn.num_heads == 4
    )
    assert cli.datamodule.processor.num_image_tokens == 6  # the data side expands <image> to 6 ids
    assert cli.model.hparams["connector"]["num_queries"] == 6
    # One loss step through the whole model: 6 <image> positions take the 6 resampled tokens.
    ids = torch.tensor([[1] + [m.image_token_id] * 6 + [40, 41, 2]])
    labels = torch.tensor([[-100] * 8 + [41, 2]])
    loss = m(ids, torch.ones_like(ids), labels, torch.randn(1, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and m.connector.queries.grad.abs().sum() > 0
    cli = LMMCLI(
        args=common + ["--model.connector.name", "pixel_shuffle", "--model.connector.factor", "2"],
        run=False,
    )
    assert (
        isinstance(cli.model.model.connector, PixelShuffleMLP)
        and cli.model.model.num_image_tokens == 4
    )
    cli = LMMCLI(args=common + ["--model.connector", "linear"], run=False)
    assert cli.model.hparams["connector"] == "linear" and cli.model.model.num_image_tokens == 16


@pytest.mark.parametrize(
    "name",
    ["linear", "mlp2x_gelu", "pool2x2_mlp2x_gelu", "resampler", "pixel_shuffle", "fused_gelu_mlp"],
)
def test_output_init_std_reinitialises_only_the_output_layer(name):
    torch.manual_seed(0)
    default = build_connector(name, 16, 64, 16)
    torch.manual_seed(0)
    small = build_connector(ConnectorConfig(name=name, output_init_std=0.001), 16, 64, 16)
    layers = [m for m in small.modules() if isinstance(m, torch.nn.Linear)]
    out = layers[-1]
    assert out.out_features == 64 and abs(out.weight.std().item() - 0.001) < 3e-4
    assert out.bias is None or not out.bias.any()
    # Everything before the output layer keeps PyTorch's default initialisation.
    before = {k: v for k, v in default.state_dict().items()}
    out_names = {f"{n}.weight" for n, m in small.named_modules() if m is out} | {
        f"{n}.bias" for n, m in small.named_modules() if m is out
    }
    assert all(
        torch.equal(v, before[k]) for k, v in small.state_dict().items() if k not in out_names
    )
    x = torch.randn(2, 16, 16)
    assert small(x).norm() < 0.1 * default(x).norm()


def test_output_init_std_needs_a_linear_output():
    with pytest.raises(ConfigError, match="output_init_std"):
        build_connector(ConnectorConfig(name="identity", output_init_std=0.01), 8, 8, 4)
    with pytest.raises(ConfigError, match="'tinyllava_resampler' has no linear output layer"):
        build_connector(ConnectorConfig(name="tinyllava_resampler", output_init_std=0.01), 8, 8, 4)


# -- connectors for fused towers ------------------------------------------------------------------


def test_fused_gelu_mlp_is_prismatics_fused_projector():
    """prismatic/util/nn_utils.py FusedMLPProjector ("fused-gelu-mlp"): Linear(D, 4D) -> GELU ->
    Linear(4D, Dl) -> GELU -> Linear(Dl, Dl), every layer with a bias; tokens unchanged."""
    import torch.nn.functional as F

    c = build_connector("fused_gelu_mlp", 6, 10, 16)
    linears = [m for m in c.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 24), (24, 10), (10, 10)]
    assert all(m.bias is not None for m in linears) and c.num_output_tokens == 16
    x = torch.randn(2, 16, 6)
    a, b, o = linears
    expected = o(F.gelu(b(F.gelu(a(x)))))
    torch.testing.assert_close(c(x), expected, rtol=0, atol=1e-6)


def test_mof_mlp_runs_each_towers_tokens_through_its_own_mlp():
    """TinyLLaVA connector/mof_mlp.py: merged[:, 0::2] = clip(x_clip), merged[:, 1::2] =
    dinov2(x_dino), each Linear(D, Dl) -> GELU -> Linear(Dl, Dl); the fused tower's interleaved
    tokens come in as tower 0, tower 1, tower 0, ..."""
    import torch.nn.functional as F

    c = build_connector("mof_mlp", 8, 12, 32, token_groups=2)
    assert c.num_output_tokens == 32 and len(c.mlps) == 2
    x = torch.randn(2, 32, 8)
    out = c(x)
    for k in range(2):
        first, second = c.mlps[k][0], c.mlps[k][2]
        torch.testing.assert_close(
            out[:, k::2], second(F.gelu(first(x[:, k::2]))), rtol=0, atol=1e-6
        )
    assert not torch.allclose(c.mlps[0][0].weight, c.mlps[1][0].weight)  # separate weights
    with pytest.raises(ConfigError, match="mof_mlp.*model.vision.fused.join: interleave"):
        build_connector("mof_mlp", 8, 12, 16)


# -- Q-Former -------------------------------------------------------------------------------------

_SMALL_QFORMER = dict(
    num_queries=5, num_layers=3, hidden_size=16, heads=2, cross_attention_frequency=2
)


def test_qformer_gives_num_queries_tokens_with_blip2_cross_attention_layers():
    from transformers import Blip2QFormerModel

    c = build_connector(ConnectorConfig(name="qformer", **_SMALL_QFORMER), 24, 12, 49)
    assert isinstance(c.qformer, Blip2QFormerModel) and c.num_output_tokens == 5
    assert c.query_tokens.shape == (1, 5, 16) and c.proj.out_features == 12
    # BLIP-2: a cross-attention to the image in layers 0, f, 2f, ...; its keys read the tower width.
    layers = c.qformer.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [True, False, True]
    assert layers[0].crossattention.attention.key.in_features == 24
    for n in (49, 7):  # any number of tower tokens
        out = c(torch.randn(3, n, 24))
        assert out.shape == (3, 5, 12)
    x = torch.randn(2, 49, 24)
    assert not torch.allclose(c(x)[0], c(x.flip(0))[0])  # the output reads the image


def test_qformer_gradients_reach_the_queries_and_every_cross_attention():
    c = build_connector(ConnectorConfig(name="qformer", **_SMALL_QFORMER), 24, 12, 49)
    c(torch.randn(2, 49, 24)).pow(2).mean().backward()
    assert c.query_tokens.grad is not None and c.query_tokens.grad.abs().sum() > 0
    cross = [(n, p) for n, p in c.named_parameters() if ".crossattention." in n]
    assert {n.split(".")[3] for n, _ in cross} == {"0", "2"}  # layers with cross-attention
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in cross if n.endswith("weight")
    )


def test_qformer_options_are_checked():
    with pytest.raises(
        ConfigError, match="model.connector.heads=3 must divide model.connector.hidden_size=16"
    ):
        build_connector(
            ConnectorConfig(name="qformer", hidden_size=16, heads=3, num_layers=1), 8, 8, 4
        )
    with pytest.raises(ConfigError, match="model.connector.num_layers must be >= 1"):
        build_connector(ConnectorConfig(name="qformer", num_layers=0), 8, 8, 4)
    with pytest.raises(
        ConfigError, match="model.connector.num_layers does not apply to connector 'resampler'"
    ):
        build_connector(ConnectorConfig(name="resampler", num_layers=2), 8, 8, 4)


def test_qformer_one_fit_step_through_the_cli(tiny_models, tiny_world, tmp_path):
    """``lmm fit`` with connector qformer: one optimizer step moves the queries."""
    from lmm.train.cli import LMMCLI

    root, _ = tiny_world
    args = [
        "--model.vision.name_or_path", str(tiny_models["vision"]), "--model.vision.feature_layer", "-1",
        "--model.llm.name_or_path", str(tiny_models["llm"]),
        "--model.connector.name", "qformer", "--model.connector.num_queries", "4",
        "--model.connector.num_layers", "2", "--model.connector.hidden_size", "16",
        "--model.connector.heads", "2",
        "--model.optim.warmup_ratio", "0",  # the first step at lr 0 would not move anything
        "--data.train", f"[{root}/pretrain/shard-*.tar]", "--data.batch_size", "2",
        "--data.num_workers", "0", "--data.max_length", "64",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.max_steps", "1",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    cli = LMMCLI(args=args, run=False)
    model = cli.model.model
    assert model.num_image_tokens == 4 and cli.datamodule.processor.num_image_tokens == 4
    before = model.connector.query_tokens.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert not torch.equal(model.connector.query_tokens.detach(), before)


# -- TinyLLaVA's resampler against the reference architecture -------------------------------------
# Written out from TinyLLaVA_Factory tinyllava/model/connector/resampler.py (commit 9e010c0, the
# version in TinyLLaVA/TinyLLaVA_Factory@53f12c7): PerceiverResampler(config) with
# dim = config.hidden_size (the LLM's), depth = num_resampler_layers (ModelArguments default 3),
# num_latents = num_queries (default 128), PerceiverAttention(dim, dim_head=64, heads=8),
# FeedForward(dim, mult=4). Rewritten here with plain torch ops (the reference uses einops).


class _RefPerceiverAttention(torch.nn.Module):
    def __init__(self, dim, dim_head=64, heads=8):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        inner = dim_head * heads
        self.norm_media = torch.nn.LayerNorm(dim)
        self.norm_latents = torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_kv = torch.nn.Linear(dim, inner * 2, bias=False)
        self.to_out = torch.nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):  # x: (b, T, n1, D), latents: (b, T, n2, D)
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)

        def heads(t):  # "b t n (h d) -> b h t n d"
            b, tt, n, _ = t.shape
            return t.view(b, tt, n, self.heads, -1).permute(0, 3, 1, 2, 4)

        q, k, v = heads(q) * self.scale, heads(k), heads(v)
        sim = q @ k.transpose(-1, -2)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v  # b h t n d
        b, h, tt, n, d = out.shape
        return self.to_out(out.permute(0, 2, 3, 1, 4).reshape(b, tt, n, h * d))


class _RefPerceiverResampler(torch.nn.Module):
    def __init__(self, hidden_size, vision_hidden_size, depth=3, num_latents=128):
        super().__init__()
        dim = hidden_size
        self.latents = torch.nn.Parameter(torch.randn(num_latents, dim))
        self.layers = torch.nn.ModuleList([])
        self.linear = torch.nn.Linear(vision_hidden_size, hidden_size)
        for _ in range(depth):
            ff = torch.nn.Sequential(
                torch.nn.LayerNorm(dim),
                torch.nn.Linear(dim, 4 * dim, bias=False),
                torch.nn.GELU(),
                torch.nn.Linear(4 * dim, dim, bias=False),
            )
            self.layers.append(torch.nn.ModuleList([_RefPerceiverAttention(dim), ff]))
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        x = self.linear(x).unsqueeze(1)
        latents = self.latents[None, None].repeat(x.shape[0], 1, 1, 1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents).squeeze(1)


def test_tinyllava_resampler_gives_128_tokens_at_the_llm_width():
    torch.manual_seed(0)
    c = build_connector("tinyllava_resampler", 24, 40, 729)
    assert c.num_output_tokens == 128 and len(c.layers) == 3
    for n in (729, 576, 5):  # any tower token count
        assert c(torch.randn(2, n, 24)).shape == (2, 128, 40)
    small = build_connector(
        ConnectorConfig(name="tinyllava_resampler", num_queries=7, depth=1, heads=2, head_dim=4),
        24, 40, 16,
    )  # fmt: skip
    assert small.num_output_tokens == 7 and small(torch.randn(1, 16, 24)).shape == (1, 7, 40)
    assert small.layers[0][0].to_q.weight.shape == (8, 40)
    with pytest.raises(
        ConfigError,
        match="model.connector.factor does not apply to connector 'tinyllava_resampler'",
    ):
        build_connector(ConnectorConfig(name="tinyllava_resampler", factor=3), 24, 40, 16)


def test_tinyllava_resampler_loads_into_the_reference_and_computes_the_same():
    """Same parameter names and shapes as TinyLLaVA_Factory's PerceiverResampler (its checkpoint
    keys are ours behind ``connector._connector.``), and the same output."""
    vision, llm = 24, 40
    torch.manual_seed(0)
    ours = build_connector("tinyllava_resampler", vision, llm, 729).eval()
    ref = _RefPerceiverResampler(hidden_size=llm, vision_hidden_size=vision).eval()
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert mine == theirs
    # The shapes the notes' reference reading lists, for D = LLM width and V = tower width.
    assert theirs["latents"] == (128, llm) and theirs["linear.weight"] == (llm, vision)
    assert theirs["layers.2.0.to_q.weight"] == (512, llm)
    assert theirs["layers.2.0.to_kv.weight"] == (1024, llm)
    assert theirs["layers.2.0.to_out.weight"] == (llm, 512)
    assert theirs["layers.2.1.1.weight"] == (4 * llm, llm) and theirs["layers.2.1.3.weight"] == (
        llm,
        4 * llm,
    )
    # Biases only in the first projection and the LayerNorms: attention and feed-forward have none.
    norms = {
        f"layers.{i}.{n}.bias" for i in range(3) for n in ("0.norm_media", "0.norm_latents", "1.0")
    }
    assert {k for k in theirs if k.endswith("bias")} == {"linear.bias", "norm.bias"} | norms
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 50, vision)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    # The latents start as the reference's: standard normal, not the 0.02 of lmm's resampler.
    assert 0.8 < ours.latents.std().item() < 1.2


def test_tinyllava_resampler_refuses_anyres(tiny_models):
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM
    from lmm.model.towers import VisionConfig
    from lmm.visual.anyres import AnyResConfig

    vision = VisionConfig(
        name_or_path=str(tiny_models["vision"]), feature_layer=-1, anyres=AnyResConfig()
    )
    spec = ConnectorConfig(
        name="tinyllava_resampler", num_queries=9
    )  # a square count, still no grid
    with pytest.raises(
        ConfigError, match="'tinyllava_resampler' gives 9 tokens from learned queries"
    ):
        LMM(vision, LanguageConfig(name_or_path=str(tiny_models["llm"])), spec)
