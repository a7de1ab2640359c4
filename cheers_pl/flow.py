"""Flow matching: the path, its velocity target, t sampling, the time shift and an Euler sampler.

Conventions (DESIGN sections 1, 3, 4): noise z0 ~ N(0, I) at t = 0, data z1 at t = 1,

    z_t = t * z1 + (1 - t) * z0,        v* = dz_t/dt = z1 - z0,
    shifted t' = a t / (1 + (a - 1) t)  (a < 1 spends more steps near the noise end),
    CFG:   v = v_u + s (v_c - v_u).

Sampling grid: t = linspace(0, 1, N), shifted; Euler steps z += v(z, t_i) * (t_{i+1} - t_i), the
last step (at t = 1) using dt = 1/N as the released sampler does (``last_dt="released"``);
``last_dt="exact"`` instead integrates on linspace(0, 1, N + 1) and lands exactly at t = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

T_EPS = 1e-6
LAST_DT_MODES = ("released", "exact")


def interpolate(z1: Tensor, z0: Tensor, t: Tensor) -> Tensor:
    """z_t = t z1 + (1 - t) z0, with t (N,) broadcast over (N, ...)."""
    t = t.view(-1, *([1] * (z1.ndim - 1))).to(z1)
    return t * z1 + (1 - t) * z0


def velocity_target(z1: Tensor, z0: Tensor) -> Tensor:
    """The straight path's constant velocity z1 - z0."""
    return z1 - z0


def sample_t(n: int, generator: torch.Generator | None = None, device=None, eps: float = T_EPS) -> Tensor:
    """t ~ U(0, 1) clamped to [eps, 1 - eps], shape (n,)."""
    t = torch.rand(n, generator=generator, device=device)
    return t.clamp(eps, 1 - eps)


def time_shift(t: Tensor, shift: float) -> Tensor:
    """t' = a t / (1 + (a - 1) t); fixes 0 and 1, identity at a = 1."""
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sampling_schedule(steps: int, shift: float = 1.0, last_dt: str = "released") -> tuple[Tensor, Tensor]:
    """(t (N,), dt (N,)) for an N-step Euler sampler, float64 for exactness; see the module doc."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if last_dt not in LAST_DT_MODES:
        raise ValueError(f"last_dt={last_dt!r}; valid choices are {list(LAST_DT_MODES)}")
    if last_dt == "exact":
        grid = time_shift(torch.linspace(0, 1, steps + 1, dtype=torch.float64), shift)
        return grid[:-1], grid[1:] - grid[:-1]
    t = time_shift(torch.linspace(0, 1, steps, dtype=torch.float64), shift)
    dt = torch.cat([t[1:] - t[:-1], torch.tensor([1.0 / steps], dtype=torch.float64)])
    return t, dt


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: v_u + s (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_sample(
    velocity: Callable[[Tensor, float, int], Tensor],
    z0: Tensor,
    t: Tensor,
    dt: Tensor,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Integrate dz/dt = velocity(z, t_i, i) from z0 with explicit Euler; returns z after the last step."""
    z = z0
    for i, (ti, dti) in enumerate(zip(t.tolist(), dt.tolist(), strict=True)):
        z = z + velocity(z, ti, i) * dti
        if callback is not None:
            callback(i, z)
    return z
