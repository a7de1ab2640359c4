"""DiT block pieces: RoPE, grouped-query attention, SwiGLU, AdaLN-Zero block and final layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cheers_pl.components.dit import (
    Attention,
    DiTBlock,
    FinalLayer,
    SwiGLU,
    apply_rope,
    rope_cos_sin,
)

F64 = torch.float64


def _randomise(module: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def test_rope_tables_rotate_half_layout():
    d, base = 8, 1e4
    cos, sin = rope_cos_sin(torch.arange(5), d, base, dtype=F64)
    assert cos.shape == sin.shape == (5, d)
    pos = torch.arange(5, dtype=F64)[:, None]
    ang = pos * base ** (-2 * torch.arange(d // 2, dtype=F64) / d)  # (5, d/2)
    torch.testing.assert_close(cos, torch.cat([ang.cos(), ang.cos()], -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sin, torch.cat([ang.sin(), ang.sin()], -1), rtol=1e-12, atol=1e-12)
    # Rotate-half: component 0 pairs with component d/2 (not with component 1 as interleaved RoPE).
    x = torch.zeros(1, 1, 5, d, dtype=F64)
    x[..., 0] = 1.0
    y = apply_rope(x, cos, sin)[0, 0]
    ang0 = torch.arange(5, dtype=F64)
    torch.testing.assert_close(y[:, 0], ang0.cos())
    torch.testing.assert_close(y[:, d // 2], ang0.sin())
    assert torch.all(y[:, 1 : d // 2] == 0) and torch.all(y[:, d // 2 + 1 :] == 0)


def test_apply_rope_preserves_norm():
    x = torch.randn(2, 3, 11, 16, dtype=F64)
    cos, sin = rope_cos_sin(torch.arange(11) * 7, 16, dtype=F64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_rope_relative_position_property():
    d = 16
    q = torch.randn(1, 1, 1, d, dtype=F64)
    k = torch.randn(1, 1, 1, d, dtype=F64)

    def score(m: int, n: int) -> float:
        cm, sm = rope_cos_sin(torch.tensor([m]), d, dtype=F64)
        cn, sn = rope_cos_sin(torch.tensor([n]), d, dtype=F64)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum().item()

    for m, n in [(3, 1), (10, 4), (0, 7)]:
        ref = score(m, n)
        for shift in (1, 5, 100):
            assert score(m + shift, n + shift) == pytest.approx(ref, abs=1e-10)
    # ...and it does depend on the offset.
    assert abs(score(3, 1) - score(3, 2)) > 1e-6


def _hand_attention(attn: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    n, t, w = x.shape
    h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(n, t, h, d).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(n, t, kv, d).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(n, t, kv, d).transpose(1, 2)

    def rot(z: torch.Tensor) -> torch.Tensor:
        return torch.cat([-z[..., d // 2 :], z[..., : d // 2]], dim=-1)

    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    # Query head i reads kv head i // (h // kv) (Qwen / Llama repeat_kv).
    k = k.repeat_interleave(h // kv, dim=1)
    v = v.repeat_interleave(h // kv, dim=1)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return ((p @ v).transpose(1, 2).reshape(n, t, w)) @ attn.o_proj.weight.T


def test_attention_gqa_matches_hand_softmax():
    w, h, kv = 32, 4, 2
    attn = Attention(w, h, kv).double()
    assert attn.head_dim == 8
    assert attn.k_proj.out_features == attn.v_proj.out_features == kv * 8
    assert attn.q_proj.out_features == attn.o_proj.out_features == w
    assert all(m.bias is None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    x = torch.randn(2, 9, w, dtype=F64)
    cos, sin = rope_cos_sin(torch.arange(9), 8, dtype=F64)
    torch.testing.assert_close(attn(x, cos, sin), _hand_attention(attn, x, cos, sin), rtol=1e-10, atol=1e-10)
    # Bidirectional: the first token sees the last.
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(attn(x2, cos, sin)[:, 0], attn(x, cos, sin)[:, 0])


def test_swiglu_formula():
    mlp = SwiGLU(16, mlp_ratio=2.5).double()
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 40 and mlp.down_proj.in_features == 40
    x = torch.randn(3, 5, 16, dtype=F64)
    ref = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), ref)


def test_dit_block_identity_at_init_then_modulated():
    blk = DiTBlock(32, 4, 2)
    assert isinstance(blk.input_layernorm, nn.RMSNorm) and isinstance(
        blk.post_attention_layernorm, nn.RMSNorm
    )
    lin = blk.adaLN_modulation[1]
    assert isinstance(blk.adaLN_modulation[0], nn.SiLU) and lin.out_features == 6 * 32
    assert torch.all(lin.weight == 0) and torch.all(lin.bias == 0)
    x, c = torch.randn(2, 6, 32), torch.randn(2, 32)
    cos, sin = rope_cos_sin(torch.arange(6), 8)
    assert torch.equal(blk(x, c, cos, sin), x)
    _randomise(blk.adaLN_modulation)
    assert not torch.allclose(blk(x, c, cos, sin), x, atol=1e-3)


def test_dit_block_modulation_order():
    """shift1, scale1, gate1, shift2, scale2, gate2; modulate = x * (1 + scale) + shift."""
    blk = DiTBlock(32, 4, 2, mlp_ratio=2.0).double()
    _randomise(blk)
    x, c = torch.randn(2, 6, 32, dtype=F64), torch.randn(2, 32, dtype=F64)
    cos, sin = rope_cos_sin(torch.arange(6), 8, dtype=F64)
    m = (F.silu(c) @ blk.adaLN_modulation[1].weight.T + blk.adaLN_modulation[1].bias).chunk(6, dim=-1)
    sh1, sc1, g1, sh2, sc2, g2 = (u[:, None] for u in m)

    def rms(z, wt):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * wt

    y = x + g1 * _hand_attention(blk.attn, rms(x, blk.input_layernorm.weight) * (1 + sc1) + sh1, cos, sin)
    y = y + g2 * blk.mlp(rms(y, blk.post_attention_layernorm.weight) * (1 + sc2) + sh2)
    torch.testing.assert_close(blk(x, c, cos, sin), y, rtol=1e-9, atol=1e-9)


def test_final_layer_zero_init_and_formula():
    fin = FinalLayer(32, 12).double()
    assert fin.linear.out_features == 12 and fin.adaLN_modulation[1].out_features == 64
    x, c = torch.randn(2, 5, 32, dtype=F64), torch.randn(2, 32, dtype=F64)
    assert torch.equal(fin(x, c), torch.zeros(2, 5, 12, dtype=F64))
    _randomise(fin)
    shift, scale = (F.silu(c) @ fin.adaLN_modulation[1].weight.T + fin.adaLN_modulation[1].bias).chunk(2, -1)
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * fin.norm_final.weight
    ref = (normed * (1 + scale[:, None]) + shift[:, None]) @ fin.linear.weight.T + fin.linear.bias
    torch.testing.assert_close(fin(x, c), ref, rtol=1e-9, atol=1e-9)
