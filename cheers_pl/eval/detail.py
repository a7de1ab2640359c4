"""A detail score for generated images: their high-frequency energy beside real images' (the HFI question).

For each image (grayscale: the channel mean, its own mean removed) the power spectrum
``|FFT2|^2`` is split at a radial frequency ``cutoff`` (cycles per pixel; Nyquist is 0.5 on each
axis): the *high-frequency fraction* is the power above the cutoff over the total power (0 for a
flat image). It does not depend on brightness or contrast, only on how much of the image's
structure is fine. The **detail ratio** is the mean fraction of generated images over that of
real images of the same size: ~1 matches the real images' detail, < 1 is blurrier, > 1 noisier.
"""

from __future__ import annotations

import torch
from torch import Tensor

CUTOFF = 0.25  # cycles/pixel: half of Nyquist


def high_frequency_fraction(images: Tensor, cutoff: float = CUTOFF) -> Tensor:
    """Images (N,3,H,W) or (N,H,W) -> (N,) fraction of spectral power above ``cutoff`` cycles/pixel."""
    x = images.detach().float().cpu()
    x = x.mean(1) if x.ndim == 4 else x
    if x.ndim != 3:
        raise ValueError(f"detail: images must be (N,3,H,W) or (N,H,W), got {tuple(images.shape)}")
    x = x - x.mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square()
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    high = (fy.square() + fx.square()).sqrt() > cutoff
    total = power.sum((-2, -1))
    return torch.where(
        total > 0, (power * high).sum((-2, -1)) / total.clamp_min(1e-12), torch.zeros_like(total)
    )


def detail_ratio(generated: Tensor, real: Tensor, cutoff: float = CUTOFF) -> dict[str, float]:
    """``{"detail_generated", "detail_real", "detail_ratio"}``: mean fractions and their ratio."""
    gen = float(high_frequency_fraction(generated, cutoff).mean())
    ref = float(high_frequency_fraction(real, cutoff).mean())
    return {
        "detail_generated": gen,
        "detail_real": ref,
        "detail_ratio": gen / ref if ref > 0 else float("nan"),
    }
