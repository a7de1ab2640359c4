"""Understanding projector: SigLIP features -> LLM tokens with 4x (2x2) token compression.

    (B, T, D) -> LayerNorm(D) -> grid (B, D, S, S) -> pixel-unshuffle 2x2 -> (B, T/4, 4D)
              -> Linear(4D, 4D) -> GELU -> Linear(4D, llm_hidden)                   (B, T/4, H)

At paper size: (B, 1024, 1152) -> (B, 256, 1536). Released names: ``layernorm``, ``mlp.0``, ``mlp.2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from cheers_pl.components.flavor import Flavor, apply_overrides


@dataclass
class ProjectorConfig:
    vision_hidden: int = 1152
    llm_hidden: int = 1536
    unshuffle: int = 2
    mlp_hidden: int | None = None  # default: unshuffle^2 * vision_hidden
    eps: float = 1e-5


class UnderstandingProjector(nn.Module):
    """(B, T, D) semantic tokens -> (B, T / unshuffle^2, llm_hidden) LLM input tokens."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        wide = cfg.unshuffle**2 * cfg.vision_hidden
        hidden = cfg.mlp_hidden or wide
        self.layernorm = nn.LayerNorm(cfg.vision_hidden, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(wide, hidden), nn.GELU(), nn.Linear(hidden, cfg.llm_hidden))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        side, r = math.isqrt(t), self.cfg.unshuffle
        if side * side != t or side % r:
            raise ValueError(f"projector: {t} tokens is not a square grid divisible by {r}")
        x = self.layernorm(x).transpose(1, 2).reshape(b, d, side, side)
        x = F.pixel_unshuffle(x, r).flatten(2).transpose(1, 2)
        return self.mlp(x)


def _config(base: dict[str, Any], **overrides: Any) -> ProjectorConfig:
    return ProjectorConfig(
        **apply_overrides(base, overrides, ProjectorConfig.__dataclass_fields__, "projector")
    )


FLAVORS = {
    "tiny": Flavor(lambda **o: _config(dict(vision_hidden=32, llm_hidden=64), **o), UnderstandingProjector),
    "paper": Flavor(lambda **o: _config({}, **o), UnderstandingProjector, "1152 -> 1536"),
}
