"""DiT block of the cascaded flow-matching head (DESIGN.md section 3).

A Qwen-style transformer block (RMSNorm, grouped-query attention with 1D RoPE, SwiGLU MLP),
made bidirectional and conditioned on the time embedding through AdaLN-Zero: six per-sample
modulations (shift, scale, gate for attention and for the MLP) from a zero-initialised
Linear, so every block starts as the identity.

Parameter names follow the released checkpoint: ``input_layernorm``, ``attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, ``adaLN_modulation.1``; the final
layer has ``norm_final``, ``adaLN_modulation.1``, ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rope_cos_sin(
    positions: Tensor,
    head_dim: int,
    base: float = 1e4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """RoPE tables in the Qwen/Llama rotate-half layout.

    Args:
        positions: (T,) integer positions.
        head_dim: even per-head width D.
        base: RoPE theta.
        dtype, device: of the returned tables (angles are computed in float32, or float64 if asked).

    Returns:
        cos, sin: each (T, D); column ``j`` and ``j + D/2`` share the frequency ``base**(-2j/D)``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    device = device if device is not None else positions.device
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=work, device=device) / head_dim))
    angles = positions.to(device=device, dtype=work)[:, None] * inv_freq[None]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (N, H, T, D) by the tables ``cos``/``sin`` (T, D); returns (N, H, T, D)."""
    return x * cos + _rotate_half(x) * sin


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with x (N, T, W) and shift/scale (N, W) broadcast over T."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Bidirectional grouped-query self-attention with RoPE.

    ``q_proj``/``o_proj``: W -> W; ``k_proj``/``v_proj``: W -> num_kv_heads * head_dim; no bias.
    """

    def __init__(self, width: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        if width % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"width {width} must divide by num_heads {num_heads}, which must divide by "
                f"num_kv_heads {num_kv_heads}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = width // num_heads
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, kv_width, bias=False)
        self.v_proj = nn.Linear(width, kv_width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (N, T, W), cos/sin (T, head_dim) -> (N, T, W). No mask: every token sees every token."""
        n, t, _ = x.shape
        q = self.q_proj(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(n, t, -1))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, hidden = int(mlp_ratio * W), no bias."""

    def __init__(self, width: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * width)
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., W) -> (..., W)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _adaln(width: int, n_mod: int) -> nn.Sequential:
    """SiLU then a zero-initialised Linear(width, n_mod * width): AdaLN-Zero."""
    lin = nn.Linear(width, n_mod * width)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(nn.SiLU(), lin)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with AdaLN-Zero conditioning on c (N, W)."""

    def __init__(
        self, width: int, num_heads: int, num_kv_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(width, eps=eps)
        self.attn = Attention(width, num_heads, num_kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(width, eps=eps)
        self.mlp = SwiGLU(width, mlp_ratio)
        self.adaLN_modulation = _adaln(width, 6)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (N, T, W), c (N, W), cos/sin (T, head_dim) -> (N, T, W)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.input_layernorm(x), shift1, scale1), cos, sin)
        x = x + gate2[:, None] * self.mlp(modulate(self.post_attention_layernorm(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """RMSNorm, shift/scale modulation by c (zero-initialised), then ``linear`` to ``out_dim``.

    ``zero_init`` also zeroes ``linear`` (DiT's output layer). Only the head's very last layer may
    do so: stage A's final layer feeds stage B through LayerNorm, and zeroing it too would leave
    stage B an all-zero input whose output layer then never receives a weight gradient.
    """

    def __init__(self, width: int, out_dim: int, eps: float = 1e-6, zero_init: bool = True) -> None:
        super().__init__()
        self.norm_final = nn.RMSNorm(width, eps=eps)
        self.adaLN_modulation = _adaln(width, 2)
        self.linear = nn.Linear(width, out_dim)
        if zero_init:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (N, T, W), c (N, W) -> (N, T, out_dim)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
