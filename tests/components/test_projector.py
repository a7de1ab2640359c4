"""Understanding projector: LayerNorm -> 2x2 pixel-unshuffle -> MLP, 4x token compression."""

import pytest
import torch
import torch.nn.functional as F

from cheers_pl import registry


def test_shapes_and_formula():
    torch.manual_seed(0)
    proj = registry.build("projector", "tiny")
    x = torch.randn(2, 64, 32)  # 8x8 grid of width 32
    y = proj(x)
    assert y.shape == (2, 16, 64)
    # float64 reference: token (i, j) of the 4x4 output gathers grid cells (2i+dy, 2j+dx), channel-major
    p = proj.double()
    xn = F.layer_norm(x.double(), (32,), p.layernorm.weight, p.layernorm.bias, p.layernorm.eps)
    grid = xn.view(2, 8, 8, 32)
    i, j = 1, 2
    cells = [grid[:, 2 * i + dy, 2 * j + dx] for dy in range(2) for dx in range(2)]  # each (2, 32)
    v = torch.stack(cells, -1).reshape(2, 128)  # channel c*4 + 2*dy + dx
    ref = p.mlp(v)
    torch.testing.assert_close(p(x.double())[:, i * 4 + j], ref)


def test_paper_parameter_count():
    with torch.device("meta"):
        proj = registry.build("projector", "paper")
    d, w, h = 1152, 4608, 1536
    assert sum(p.numel() for p in proj.parameters()) == 2 * d + (w * w + w) + (w * h + h)


def test_non_square_grid_is_refused():
    proj = registry.build("projector", "tiny")
    with pytest.raises(ValueError, match="60 tokens"):
        proj(torch.randn(1, 60, 32))
