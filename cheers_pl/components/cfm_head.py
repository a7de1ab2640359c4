"""Cascaded flow-matching head (DESIGN.md section 3).

Shapes at the paper's size (Sa = 16, Sb = 32)::

    h  (N, 256, 1536)   LLM final hidden states at the generation image's positions
    t  (N,)             flow time in [0, 1]
    -> stage A: 7 DiT blocks at 1536, RoPE positions 0..255, conditioned on emb_a
    -> final layer to 4*1152, (N, 4608, 16, 16), PixelShuffle(2) -> Z' (N, 1024, 1152)
    -> HFI: Z' <- LayerNorm(Z' + g * detail), g = gate(Z') one scalar per token (N, 1024)
    -> stage B: 3 DiT blocks at 1152, conditioned on emb_b
    -> final layer to 128 -> v (N, 128, 32, 32)

``detail`` is the SigLIP *embeddings* (patch conv + position embedding) of D(z_t), computed
outside the head. The gate map g reshaped to (N, 32, 32) is the HFI heat map (paper Fig. 5).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from cheers_pl.components.dit import DiTBlock, FinalLayer, rope_cos_sin
from cheers_pl.components.flavor import Flavor, apply_overrides
from cheers_pl.components.time_embed import TimeEmbedConfig, TimeEmbedder

HFI_MODES = ("gated", "none")
STAGE_B_ROPE_MODES = ("released", "sequential")


@dataclass
class CFMHeadConfig:
    """Sizes and switches of :class:`CFMHead`.

    Attributes:
        width_a, depth_a, heads_a, kv_heads_a: stage A (width = the LLM hidden size).
        width_b, depth_b, heads_b, kv_heads_b: stage B (width = the SigLIP hidden size).
        mlp_ratio: SwiGLU hidden = int(mlp_ratio * width).
        rope_base: 1D RoPE theta of both stages.
        out_channels: channels of the velocity (patchified VAE latent).
        norm_eps: RMSNorm eps.
        freq_dim: width of the time sinusoid.
        hfi: ``"gated"`` (paper) or ``"none"`` (ablation: no gate, detail ignored).
        stage_b_rope: ``"released"`` (positions 0..Tb/2-1 twice) or ``"sequential"`` (0..Tb-1).
    """

    width_a: int = 1536
    depth_a: int = 7
    heads_a: int = 12
    kv_heads_a: int = 2
    width_b: int = 1152
    depth_b: int = 3
    heads_b: int = 16
    kv_heads_b: int = 2
    mlp_ratio: float = 4.0
    rope_base: float = 1e4
    out_channels: int = 128
    norm_eps: float = 1e-6
    freq_dim: int = 256
    hfi: str = "gated"
    stage_b_rope: str = "released"

    def __post_init__(self) -> None:
        if self.hfi not in HFI_MODES:
            raise ValueError(f"CFMHeadConfig.hfi={self.hfi!r}; valid choices are {list(HFI_MODES)}")
        if self.stage_b_rope not in STAGE_B_ROPE_MODES:
            raise ValueError(
                f"CFMHeadConfig.stage_b_rope={self.stage_b_rope!r}; "
                f"valid choices are {list(STAGE_B_ROPE_MODES)}"
            )
        for stage in ("a", "b"):
            w, h, kv = (getattr(self, f"{k}_{stage}") for k in ("width", "heads", "kv_heads"))
            if w % h:
                raise ValueError(f"CFMHeadConfig: width_{stage}={w} is not divisible by heads_{stage}={h}")
            if h % kv:
                raise ValueError(
                    f"CFMHeadConfig: heads_{stage}={h} is not divisible by kv_heads_{stage}={kv}"
                )
            if (w // h) % 2:
                raise ValueError(f"CFMHeadConfig: head_dim of stage {stage} ({w}/{h}={w // h}) must be even")


def stage_b_positions(num_tokens: int, mode: str, device: torch.device | str | None = None) -> Tensor:
    """RoPE positions (Tb,) of stage B.

    ``"released"``: arange(Tb) % (Tb // 2), i.e. 0..Tb/2-1 twice (the released quirk);
    ``"sequential"``: arange(Tb).
    """
    pos = torch.arange(num_tokens, device=device)
    if mode == "released":
        return pos % max(num_tokens // 2, 1)
    if mode == "sequential":
        return pos
    raise ValueError(f"stage_b_rope={mode!r}; valid choices are {list(STAGE_B_ROPE_MODES)}")


class HFIGate(nn.Module):
    """High-frequency injection: ``LayerNorm(z + g * detail)`` with a per-token scalar gate g.

    ``gate`` = Linear(w, w)-SiLU-Linear(w, 1), last Linear zero-initialised, no sigmoid; so at
    init g = 0 and the output is ``LayerNorm(z)``. With ``hfi="none"`` there is no ``gate`` at all.
    """

    def __init__(self, width: int, hfi: str = "gated") -> None:
        super().__init__()
        if hfi not in HFI_MODES:
            raise ValueError(f"hfi={hfi!r}; valid choices are {list(HFI_MODES)}")
        self.hfi = hfi
        if hfi == "gated":
            self.gate = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
            nn.init.zeros_(self.gate[2].weight)
            nn.init.zeros_(self.gate[2].bias)
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, z: Tensor, detail: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """z (N, T, w), detail (N, T, w) or None -> (out (N, T, w), g (N, T) or None)."""
        if self.hfi == "none":
            return self.layer_norm(z), None
        if detail is None:
            raise ValueError("HFIGate(hfi='gated') needs detail (N, T, w); got None")
        g = self.gate(z)  # (N, T, 1)
        return self.layer_norm(z + g * detail.to(z.dtype)), g.squeeze(-1)


class CFMHead(nn.Module):
    """Stage A (semantic, Sa x Sa) -> PixelShuffle(2) -> HFI -> stage B (detail, Sb x Sb) -> velocity."""

    def __init__(self, cfg: CFMHeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CFMHeadConfig()
        self.time_embed = TimeEmbedder(
            TimeEmbedConfig(freq_dim=cfg.freq_dim, width_a=cfg.width_a, width_b=cfg.width_b)
        )
        self.stage_a_blocks = nn.ModuleList(
            DiTBlock(cfg.width_a, cfg.heads_a, cfg.kv_heads_a, cfg.mlp_ratio, cfg.norm_eps)
            for _ in range(cfg.depth_a)
        )
        self.stage_a_final = FinalLayer(cfg.width_a, 4 * cfg.width_b, cfg.norm_eps, zero_init=False)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.hfi_gate = HFIGate(cfg.width_b, cfg.hfi)
        self.stage_b_blocks = nn.ModuleList(
            DiTBlock(cfg.width_b, cfg.heads_b, cfg.kv_heads_b, cfg.mlp_ratio, cfg.norm_eps)
            for _ in range(cfg.depth_b)
        )
        self.stage_b_final = FinalLayer(cfg.width_b, cfg.out_channels, cfg.norm_eps)

    def _side_a(self, h: Tensor) -> int:
        """Check h (N, Ta, width_a) and return Sa with Ta = Sa * Sa."""
        if h.ndim != 3 or h.shape[-1] != self.cfg.width_a:
            raise ValueError(f"h must be (N, Ta, {self.cfg.width_a}); got {tuple(h.shape)}")
        ta = h.shape[1]
        sa = math.isqrt(ta)
        if sa * sa != ta or ta == 0:
            raise ValueError(f"CFMHead: Ta={ta} tokens is not a perfect square")
        return sa

    def _stage_b_input(
        self, h: Tensor, emb_a: Tensor, detail: Tensor | None
    ) -> tuple[Tensor, Tensor | None, int]:
        """Stage A, pixel shuffle and HFI: returns (Z' (N, Tb, width_b), g (N, Tb) or None, Sb)."""
        sa = self._side_a(h)
        sb, tb, wb = 2 * sa, 4 * sa * sa, self.cfg.width_b
        if detail is not None and self.cfg.hfi == "gated" and tuple(detail.shape) != (h.shape[0], tb, wb):
            raise ValueError(
                f"CFMHead: detail must be (N, Tb, width_b) = {(h.shape[0], tb, wb)}; "
                f"got {tuple(detail.shape)}"
            )
        cos, sin = rope_cos_sin(
            torch.arange(h.shape[1], device=h.device),
            self.cfg.width_a // self.cfg.heads_a,
            self.cfg.rope_base,
            h.dtype,
            h.device,
        )
        x = h
        for block in self.stage_a_blocks:
            x = block(x, emb_a, cos, sin)
        x = self.stage_a_final(x, emb_a)  # (N, Ta, 4 * wb)
        x = x.transpose(1, 2).reshape(x.shape[0], 4 * wb, sa, sa)
        x = self.pixel_shuffle(x)  # (N, wb, Sb, Sb)
        z = x.flatten(2).transpose(1, 2)  # (N, Tb, wb), row-major over (Sb, Sb)
        z, g = self.hfi_gate(z, detail)
        return z, g, sb

    def stage_b_input(self, h: Tensor, t: Tensor, detail: Tensor | None = None) -> Tensor:
        """Z' after the HFI gate (N, Tb, width_b): what stage B's first block sees. For tests."""
        emb_a, _ = self.time_embed(t)
        return self._stage_b_input(h, emb_a.to(h.dtype), detail)[0]

    def forward(self, h: Tensor, t: Tensor, detail: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Predict the flow velocity.

        Args:
            h: (N, Ta, width_a) LLM hidden states, Ta = Sa * Sa.
            t: (N,) flow times in [0, 1].
            detail: (N, Tb, width_b) SigLIP embeddings of D(z_t), Tb = (2 Sa)^2; ignored
                (may be None) when ``cfg.hfi == "none"``.

        Returns:
            v: (N, out_channels, Sb, Sb) velocity, Sb = 2 Sa.
            gate: (N, Sb, Sb) HFI gate map, or None when ``cfg.hfi == "none"``.
        """
        emb_a, emb_b = self.time_embed(t)
        emb_a, emb_b = emb_a.to(h.dtype), emb_b.to(h.dtype)
        z, g, sb = self._stage_b_input(h, emb_a, detail)
        tb = sb * sb
        pos = stage_b_positions(tb, self.cfg.stage_b_rope, device=h.device)
        cos, sin = rope_cos_sin(
            pos, self.cfg.width_b // self.cfg.heads_b, self.cfg.rope_base, z.dtype, z.device
        )
        for block in self.stage_b_blocks:
            z = block(z, emb_b, cos, sin)
        v = self.stage_b_final(z, emb_b)  # (N, Tb, out)
        v = v.transpose(1, 2).reshape(v.shape[0], self.cfg.out_channels, sb, sb)
        return v, (g.reshape(-1, sb, sb) if g is not None else None)


_BASES = {
    "tiny": asdict(
        CFMHeadConfig(
            width_a=64,
            depth_a=2,
            heads_a=4,
            kv_heads_a=2,
            width_b=32,
            depth_b=1,
            heads_b=4,
            kv_heads_b=2,
            out_channels=16,
            freq_dim=32,
        )
    ),
    "paper": asdict(CFMHeadConfig()),
}
_VALID = [f.name for f in fields(CFMHeadConfig)]


def _config(name: str):
    def config(**overrides) -> CFMHeadConfig:
        return CFMHeadConfig(**apply_overrides(_BASES[name], overrides, _VALID, f"cfm_head[{name}]"))

    return config


def build(cfg: CFMHeadConfig) -> CFMHead:
    """Allocate a :class:`CFMHead` (random init, AdaLN-Zero and zero gate)."""
    return CFMHead(cfg)


FLAVORS = {
    "tiny": Flavor(_config("tiny"), build, "CFM head, widths 64/32, depths 2/1, 16 channels (CPU tests)"),
    "paper": Flavor(
        _config("paper"), build, "CFM head of the paper: 7 blocks at 1536, 3 at 1152, 128 channels"
    ),
}
