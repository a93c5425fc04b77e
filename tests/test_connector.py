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
    "name", ["linear", "mlp2x_gelu", "pool2x2_mlp2x_gelu", "resampler", "pixel_shuffle"]
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
