"""Connectors: shapes, token counts, registry errors, pooling against a hand computation."""
import pytest
import torch

from lmm.model.connector import CONNECTORS, build_connector
from lmm.registry import ConfigError, UnknownComponentError


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
        [grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(1, 2)) for r in range(2) for c in range(2)], dim=1
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
