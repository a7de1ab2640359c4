"""Time embedding of the cascaded flow-matching head (DESIGN.md section 3).

The flow time ``t`` in [0, 1] is embedded once as a sinusoid of the *raw* value (no x1000
scaling), then two MLPs map it to the widths of stage A (1536) and stage B (1152). ``t``
reaches only the head, never the LLM.

Released parameter names: ``time_embed.mlp_{1,2}.{0,2}``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from cheers_pl.components.flavor import Flavor, apply_overrides


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 1e4) -> Tensor:
    """Sinusoidal embedding of raw times.

    Args:
        t: (N,) times, used as they are (t in [0, 1] for flow matching).
        dim: output width; an odd ``dim`` gets a trailing zero column.
        max_period: the slowest frequency is ``1 / max_period``.

    Returns:
        (N, dim) float32 (or ``t``'s float dtype): ``[cos(t * f_0..f_{h-1}), sin(t * f_0..f_{h-1})]``
        with ``h = dim // 2`` and ``f_i = exp(-ln(max_period) * i / h)``.
    """
    half = dim // 2
    t = t if t.is_floating_point() else t.float()
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


@dataclass
class TimeEmbedConfig:
    """Sizes of :class:`TimeEmbedder`.

    Attributes:
        freq_dim: width of the sinusoid.
        width_a: output width for stage A (the LLM hidden size).
        width_b: output width for stage B (the SigLIP hidden size).
        max_period: sinusoid max period.
    """

    freq_dim: int = 256
    width_a: int = 1536
    width_b: int = 1152
    max_period: float = 1e4


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.SiLU(), nn.Linear(d_out, d_out))


class TimeEmbedder(nn.Module):
    """``t -> (emb_a, emb_b)`` through one sinusoid and two Linear-SiLU-Linear MLPs."""

    def __init__(self, cfg: TimeEmbedConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or TimeEmbedConfig()
        self.mlp_1 = _mlp(cfg.freq_dim, cfg.width_a)
        self.mlp_2 = _mlp(cfg.freq_dim, cfg.width_b)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Args: t (N,). Returns: emb_a (N, width_a), emb_b (N, width_b), in the MLPs' dtype."""
        freq = timestep_embedding(t.float(), self.cfg.freq_dim, self.cfg.max_period)
        freq = freq.to(self.mlp_1[0].weight.dtype)
        return self.mlp_1(freq), self.mlp_2(freq)


_BASES = {
    "tiny": asdict(TimeEmbedConfig(freq_dim=32, width_a=64, width_b=32)),
    "paper": asdict(TimeEmbedConfig()),
}
_VALID = [f.name for f in fields(TimeEmbedConfig)]


def _config(name: str):
    def config(**overrides) -> TimeEmbedConfig:
        return TimeEmbedConfig(**apply_overrides(_BASES[name], overrides, _VALID, f"time_embed[{name}]"))

    return config


def build(cfg: TimeEmbedConfig) -> TimeEmbedder:
    """Allocate a :class:`TimeEmbedder` (random init)."""
    return TimeEmbedder(cfg)


FLAVORS = {
    "tiny": Flavor(_config("tiny"), build, "time embedding, 32-dim sinusoid to 64 and 32 (CPU tests)"),
    "paper": Flavor(_config("paper"), build, "time embedding, 256-dim sinusoid to 1536 and 1152"),
}
