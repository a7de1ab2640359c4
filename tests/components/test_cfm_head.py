"""Cascaded flow-matching head: shapes, zero-init HFI gate, HFI on/off, stage-B RoPE, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cheers_pl.components import cfm_head as ch
from cheers_pl.components.dit import rope_cos_sin

N, SA = 2, 4
SB, TA, TB = 2 * SA, SA * SA, 4 * SA * SA


def _randomise(module: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _tiny(**overrides) -> ch.CFMHead:
    torch.manual_seed(0)
    return ch.FLAVORS["tiny"](**overrides)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, TA, 64, generator=g)
    t = torch.rand(N, generator=g)
    detail = torch.randn(N, TB, 32, generator=g)
    return h, t, detail


def _pixel_shuffled_tokens(x: torch.Tensor, sa: int) -> torch.Tensor:
    """Hand PixelShuffle(2) on tokens: x (N, Sa*Sa, 4C) -> (N, (2Sa)^2, C), row-major over (2Sa, 2Sa).

    Channel c*4 + i*2 + j of grid cell (y, x) goes to pixel (2y + i, 2x + j).
    """
    n, _, c4 = x.shape
    c, sb = c4 // 4, 2 * sa
    out = torch.empty(n, sb * sb, c, dtype=x.dtype)
    for y in range(sa):
        for xx in range(sa):
            cell = x[:, y * sa + xx].view(n, c, 2, 2)
            for i in range(2):
                for j in range(2):
                    out[:, (2 * y + i) * sb + 2 * xx + j] = cell[:, :, i, j]
    return out


def test_tiny_shapes_and_zero_init():
    head = _tiny()
    h, t, detail = _inputs()
    v, gate = head(h, t, detail)
    assert v.shape == (N, 16, SB, SB) and gate.shape == (N, SB, SB)
    assert torch.equal(gate, torch.zeros_like(gate))  # zero-initialised last gate layer
    assert torch.equal(v, torch.zeros_like(v))  # zero-initialised final layer (DiT convention)
    last = head.hfi_gate.gate[2]
    assert last.out_features == 1 and torch.all(last.weight == 0) and torch.all(last.bias == 0)
    assert (
        isinstance(head.pixel_shuffle, nn.PixelShuffle) and head.stage_a_final.linear.out_features == 4 * 32
    )
    # stage A's output layer is NOT zero: Z' must be non-zero at init for stage B to learn at all
    assert head.stage_a_final.linear.weight.abs().sum() > 0


def test_the_head_learns_from_its_initialisation():
    """A regression test for dead initialisations: zeroing stage A's output too makes stage B's input
    LayerNorm(0) = 0 and its output weight never gets a gradient, so the loss cannot fall."""
    torch.manual_seed(0)
    head = _tiny()
    h, t, detail = _inputs()
    target = torch.randn(N, 16, SB, SB)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(40):
        loss = (head(h, t, detail)[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05


def test_zero_gate_gives_layernorm_of_z_prime_whatever_the_detail():
    head = _tiny()
    _randomise(head.stage_a_final)  # Z' != 0; stage A blocks stay identity (AdaLN-Zero)
    h, t, detail = _inputs()
    got = head.stage_b_input(h, t, detail)
    emb_a, _ = head.time_embed(t)
    z_raw = _pixel_shuffled_tokens(head.stage_a_final(h, emb_a), SA)
    assert z_raw.abs().max() > 0.1
    ln = head.hfi_gate.layer_norm
    torch.testing.assert_close(got, F.layer_norm(z_raw, (32,), ln.weight, ln.bias, ln.eps))
    torch.testing.assert_close(head.stage_b_input(h, t, detail * 5 + 3), got, rtol=0, atol=0)


def test_open_gate_injects_detail():
    head = _tiny()
    _randomise(head)
    h, t, detail = _inputs()
    v, gate = head(h, t, detail)
    assert gate.abs().max() > 1e-3
    # Z' <- LayerNorm(Z' + g * detail), g = gate(Z') before injection.
    emb_a, _ = head.time_embed(t)
    x = h
    cos, sin = rope_cos_sin(torch.arange(TA), 16)
    for blk in head.stage_a_blocks:
        x = blk(x, emb_a, cos, sin)
    z_raw = _pixel_shuffled_tokens(head.stage_a_final(x, emb_a), SA)
    g = head.hfi_gate.gate(z_raw)
    ref = head.hfi_gate.layer_norm(z_raw + g * detail)
    torch.testing.assert_close(head.stage_b_input(h, t, detail), ref)
    torch.testing.assert_close(gate, g.view(N, SB, SB))
    v2, _ = head(h, t, detail + torch.randn_like(detail))
    assert not torch.allclose(v, v2, atol=1e-4)


def test_full_forward_composition():
    """Stage A on emb_a with positions 0..Ta-1; stage B on emb_b with released positions."""
    head = _tiny().double()
    _randomise(head)
    h, t, detail = (u.double() for u in _inputs())
    emb_a, emb_b = head.time_embed(t)
    z = head.stage_b_input(h, t, detail)
    cos, sin = rope_cos_sin(torch.arange(TB) % (TB // 2), 8, dtype=torch.float64)
    for blk in head.stage_b_blocks:
        z = blk(z, emb_b, cos, sin)
    ref = head.stage_b_final(z, emb_b).transpose(1, 2).reshape(N, 16, SB, SB)
    torch.testing.assert_close(head(h, t, detail)[0], ref)
    # t matters.
    assert not torch.allclose(head(h, t * 0.5, detail)[0], ref)


def test_hfi_none_has_no_gate_and_ignores_detail():
    head = _tiny(hfi="none")
    assert not any("hfi_gate.gate" in n for n, _ in head.named_parameters())
    assert not hasattr(head.hfi_gate, "gate")
    _randomise(head)
    h, t, detail = _inputs()
    v, gate = head(h, t, detail)
    assert gate is None
    v2, _ = head(h, t, detail * 10 - 1)
    v3, _ = head(h, t, None)
    torch.testing.assert_close(v2, v, rtol=0, atol=0)
    torch.testing.assert_close(v3, v, rtol=0, atol=0)


def test_gated_needs_detail():
    head = _tiny()
    h, t, _ = _inputs()
    with pytest.raises(ValueError, match="detail"):
        head(h, t, None)


def test_stage_b_positions():
    assert ch.stage_b_positions(8, "released").tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert ch.stage_b_positions(1024, "released").tolist() == list(range(512)) * 2
    assert ch.stage_b_positions(8, "sequential").tolist() == list(range(8))
    with pytest.raises(ValueError, match="zigzag"):
        ch.stage_b_positions(8, "zigzag")


def test_stage_b_rope_modes_differ_once_trained():
    released = _tiny(stage_b_rope="released")
    _randomise(released)
    sequential = _tiny(stage_b_rope="sequential")
    sequential.load_state_dict(released.state_dict())
    h, t, detail = _inputs()
    # Same weights: stage B input identical, output differs only through the RoPE positions.
    torch.testing.assert_close(released.stage_b_input(h, t, detail), sequential.stage_b_input(h, t, detail))
    assert not torch.allclose(released(h, t, detail)[0], sequential(h, t, detail)[0], atol=1e-4)


def test_shape_errors():
    head = _tiny()
    h, t, detail = _inputs()
    with pytest.raises(ValueError, match="Ta=15"):
        head(h[:, :15], t, detail)
    with pytest.raises(ValueError, match=r"\(2, 64, 32\).*\(2, 60, 32\)"):
        head(h, t, detail[:, :60])


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"hfi": "bogus"}, r"bogus.*gated.*none"),
        ({"stage_b_rope": "spiral"}, r"spiral.*released.*sequential"),
        ({"heads_a": 5}, r"width_a=64.*heads_a=5"),
        ({"kv_heads_b": 3}, r"heads_b=4.*kv_heads_b=3"),
        ({"width_b": 24, "heads_b": 8}, r"head_dim.*3"),
        ({"widht_a": 8}, r"widht_a.*width_a"),
    ],
)
def test_config_errors(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        ch.FLAVORS["tiny"].config(**overrides)


def _expected_params(cfg: ch.CFMHeadConfig) -> int:
    def block(w: int, heads: int, kv: int) -> int:
        hd, hidden = w // heads, int(cfg.mlp_ratio * w)
        attn = 2 * w * w + 2 * w * kv * hd
        return attn + 3 * w * hidden + 2 * w + (w * 6 * w + 6 * w)

    def final(w: int, out: int) -> int:
        return w + (w * 2 * w + 2 * w) + (w * out + out)

    wa, wb, f = cfg.width_a, cfg.width_b, cfg.freq_dim
    time = (f * wa + wa + wa * wa + wa) + (f * wb + wb + wb * wb + wb)
    gate = (wb * wb + wb) + (wb + 1) + 2 * wb  # gate.0, gate.2, layer_norm
    return (
        time
        + cfg.depth_a * block(wa, cfg.heads_a, cfg.kv_heads_a)
        + final(wa, 4 * wb)
        + gate
        + cfg.depth_b * block(wb, cfg.heads_b, cfg.kv_heads_b)
        + final(wb, cfg.out_channels)
    )


def test_paper_config_and_parameter_count():
    cfg = ch.FLAVORS["paper"].config()
    assert cfg == ch.CFMHeadConfig()
    assert (cfg.width_a, cfg.depth_a, cfg.heads_a, cfg.kv_heads_a) == (1536, 7, 12, 2)
    assert (cfg.width_b, cfg.depth_b, cfg.heads_b, cfg.kv_heads_b, cfg.out_channels) == (1152, 3, 16, 2, 128)
    with torch.device("meta"):
        head = ch.FLAVORS["paper"].build(cfg)
    n = sum(p.numel() for p in head.parameters())
    assert n == _expected_params(cfg)
    tiny_cfg = ch.FLAVORS["tiny"].config()
    assert sum(p.numel() for p in _tiny().parameters()) == _expected_params(tiny_cfg)
    no_gate = ch.FLAVORS["paper"].config(hfi="none")
    with torch.device("meta"):
        head_none = ch.FLAVORS["paper"].build(no_gate)
    wb = cfg.width_b
    assert n - sum(p.numel() for p in head_none.parameters()) == wb * wb + wb + wb + 1
