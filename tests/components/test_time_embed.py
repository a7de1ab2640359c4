"""Time embedding: the sinusoid against a float64 hand formula, the two MLPs, the flavors."""

from __future__ import annotations

import math

import pytest
import torch

from cheers_pl.components import time_embed as te


def _hand(t: list[float], dim: int, max_period: float = 1e4) -> torch.Tensor:
    """Row i = [cos(t_i f_0), ..., cos(t_i f_{h-1}), sin(t_i f_0), ..., sin(t_i f_{h-1}), (0 if odd)]."""
    half = dim // 2
    rows = []
    for ti in t:
        freqs = [math.exp(-math.log(max_period) * j / half) for j in range(half)]
        row = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        rows.append(row + [0.0] * (dim % 2))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dim", [256, 32, 7])
def test_timestep_embedding_matches_hand_formula(dim):
    t = [0.0, 1e-6, 0.25, 0.5, 0.999, 1.0]
    got = te.timestep_embedding(torch.tensor(t, dtype=torch.float64), dim)
    assert got.shape == (len(t), dim)
    torch.testing.assert_close(got, _hand(t, dim), rtol=1e-12, atol=1e-12)


def test_timestep_embedding_raw_t_and_order():
    # t = 0: cos half all ones, sin half all zeros (cos first).
    row0 = te.timestep_embedding(torch.zeros(1), 256)[0]
    assert torch.equal(row0[:128], torch.ones(128))
    assert torch.equal(row0[128:], torch.zeros(128))
    # Raw t (no x1000): the first frequency is 1, so column 0 is cos(t), column 128 is sin(t).
    t = torch.tensor([0.3, 0.9])
    emb = te.timestep_embedding(t, 256)
    torch.testing.assert_close(emb[:, 0], torch.cos(t))
    torch.testing.assert_close(emb[:, 128], torch.sin(t))
    # Odd dim: trailing zero column.
    assert torch.equal(te.timestep_embedding(t, 9)[:, -1], torch.zeros(2))


def test_time_embedder_names_shapes_and_composition():
    cfg = te.FLAVORS["tiny"].config()
    assert (cfg.freq_dim, cfg.width_a, cfg.width_b) == (32, 64, 32)
    mod = te.FLAVORS["tiny"].build(cfg)
    names = {n for n, _ in mod.named_parameters()}
    assert names == {f"mlp_{i}.{j}.{k}" for i in (1, 2) for j in (0, 2) for k in ("weight", "bias")}
    t = torch.rand(5)
    a, b = mod(t)
    assert a.shape == (5, 64) and b.shape == (5, 32)
    freq = te.timestep_embedding(t, 32)
    torch.testing.assert_close(a, mod.mlp_1(freq))
    torch.testing.assert_close(b, mod.mlp_2(freq))
    assert isinstance(mod.mlp_1[1], torch.nn.SiLU)


def test_flavors_and_overrides():
    paper = te.FLAVORS["paper"].config()
    assert paper == te.TimeEmbedConfig(freq_dim=256, width_a=1536, width_b=1152, max_period=1e4)
    assert te.FLAVORS["tiny"].config(width_a=48).width_a == 48
    with pytest.raises(ValueError, match="width_c.*width_a"):
        te.FLAVORS["tiny"].config(width_c=3)
    assert isinstance(te.FLAVORS["tiny"](), te.TimeEmbedder)
