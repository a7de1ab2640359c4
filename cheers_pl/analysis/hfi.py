"""HFI gate analysis: heat maps and per-step intensity (paper section 3.3, Figure 5).

The HFI gate ``g`` of the cascaded flow-matching head is one scalar per stage-B token, with no
sigmoid, so it can be negative. Reshaped to the latent grid it is the *HFI heat map* of one
denoising step; ``CheersModel.generate(..., return_gates=True)`` returns the maps of every step as
``gates`` of shape (steps, B, S, S), where B is the number of prompts (one sampling trajectory, a
"run", per prompt) and S the latent side.

Conventions used throughout:

* **magnitude.** Heat maps and intensities use ``|g|``: a strongly negative gate injects as much
  high-frequency detail (with flipped sign) as a strongly positive one.
* **intensity.** ``I[i, b] = mean_{u,v} |g[i, b, u, v]|``, the mean magnitude of step ``i``'s map
  of run ``b``.
* **per-run normalisation** (Figure 5b: "per-run normalization applied prior to averaging across
  samples at the same step"). Each run's trajectory ``I[:, b]`` is rescaled on its own, then the
  normalised trajectories are averaged over runs at each step:
  ``curve[i] = mean_b N(I[:, b])[i]``. ``N`` is one of

  - ``"minmax"``: ``(v - min_i v) / (max_i v - min_i v)``, in [0, 1]; a constant run maps to 0;
  - ``"max"``: ``v / max_i |v|`` (``v / max_i v`` for non-negative intensities); an all-zero run
    maps to 0;
  - ``"none"``: ``v`` unchanged (the curve is then the plain mean intensity).

* **display normalisation.** Heat-map figures rescale ``|g|`` jointly over all shown steps of one
  sample with min-max (``(a - min) / (max - min)``, constant -> 0), so that colours are comparable
  across steps; :func:`save_gate_maps` does the same jointly over all steps of each sample.

matplotlib is imported lazily, inside the two functions that draw with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALISE_MODES = ("minmax", "max", "none")
FIGURE_PADDING = 2
MIN_SAVED_SIDE = 64


# -- intensities ------------------------------------------------------------------------------
def intensity(gates: Tensor) -> Tensor:
    """Mean gate magnitude of every map: gates (steps, B, S, S) -> (steps, B) float.

    ``I[i, b] = (1 / S^2) sum_{u,v} |g[i, b, u, v]|``.
    """
    if gates.ndim != 4:
        raise ValueError(f"gates must be (steps, B, S, S), got {tuple(gates.shape)}")
    return gates.detach().float().abs().mean(dim=(-2, -1))


def normalise_per_run(values: Tensor, mode: str = "minmax") -> Tensor:
    """Rescale each run (a column, one sample's trajectory over the steps) on its own.

    values (steps, B) -> (steps, B) float; a 1-D (steps,) input is one run and stays 1-D.

    * ``"minmax"``: ``(v - min) / (max - min)`` over the run's steps; a constant run -> zeros.
    * ``"max"``: ``v / max |v|`` over the run's steps (``v / max`` for non-negative values); an
      all-zero run -> zeros.
    * ``"none"``: the values unchanged.
    """
    if mode not in NORMALISE_MODES:
        raise ValueError(
            f"normalise mode must be one of {', '.join(map(repr, NORMALISE_MODES))}; got {mode!r}"
        )
    if values.ndim not in (1, 2):
        raise ValueError(f"values must be (steps, B) or (steps,), got {tuple(values.shape)}")
    v = values.detach().float()
    if v.ndim == 1:
        return normalise_per_run(v[:, None], mode)[:, 0]
    if mode == "none":
        return v.clone()
    if mode == "minmax":
        lo, hi = v.amin(dim=0, keepdim=True), v.amax(dim=0, keepdim=True)
        span = hi - lo
        return torch.where(span > 0, (v - lo) / span.where(span > 0, torch.ones_like(span)), 0.0)
    scale = v.abs().amax(dim=0, keepdim=True)
    return torch.where(scale > 0, v / scale.where(scale > 0, torch.ones_like(scale)), 0.0)


def intensity_curve(gates: Tensor | Sequence[Tensor], mode: str = "minmax") -> Tensor:
    """Figure 5b: per-run normalised intensity averaged over runs, (steps,).

    ``gates`` is one (steps, B, S, S) tensor or a list of them from several ``generate`` calls with
    the same number of steps (the runs are concatenated along B; S may differ between calls, since
    each map is reduced to its mean first). ``curve[i] = (1/B) sum_b N(I[:, b])[i]`` with ``I`` from
    :func:`intensity` and ``N`` from :func:`normalise_per_run`.
    """
    chunks = [gates] if isinstance(gates, Tensor) else list(gates)
    if not chunks:
        raise ValueError("intensity_curve: no gate tensors given")
    values = [intensity(g) for g in chunks]
    steps = {v.shape[0] for v in values}
    if len(steps) != 1:
        shapes = ", ".join(str(tuple(g.shape)) for g in chunks)
        raise ValueError(f"intensity_curve: every run needs the same number of steps, got gates {shapes}")
    return normalise_per_run(torch.cat(values, dim=1), mode).mean(dim=1)


def evenly_spaced_steps(steps: int, n: int = 5) -> list[int]:
    """``min(n, steps)`` step indices evenly spaced over ``0 .. steps-1``, first and last included."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = min(n, steps)
    if n <= 1:
        return [0]
    return sorted({round(k * (steps - 1) / (n - 1)) for k in range(n)})


# -- heat-map figure --------------------------------------------------------------------------
def _minmax(a: Tensor) -> Tensor:
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)


def _colorize(maps: Tensor, cmap: str) -> Tensor:
    """maps (..., H, W) in [0, 1] -> (..., 3, H, W) RGB float through a matplotlib colormap."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](maps.clamp(0, 1).cpu().numpy())  # (..., H, W, 4) float64
    return torch.from_numpy(rgba[..., :3]).float().movedim(-1, -3)


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """x (N, C, h, w) -> (N, C, *size)."""
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _title_strip(texts: Sequence[str], width: int, height: int, panel_w: int, pad: int) -> Tensor:
    """(3, height, width) white strip with ``texts[i]`` in black above panel ``i``, clipped to it."""
    from PIL import Image, ImageDraw, ImageFont

    strip, font = Image.new("RGB", (width, height), (255, 255, 255)), ImageFont.load_default()
    for i, text in enumerate(texts):
        cell = Image.new("RGB", (panel_w, height), (255, 255, 255))
        ImageDraw.Draw(cell).text((1, 1), text, fill=(0, 0, 0), font=font)
        strip.paste(cell, (pad + i * (panel_w + pad), 0))
    pixels = torch.frombuffer(bytearray(strip.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def heatmap_figure(
    image: Tensor,
    gates: Tensor,
    steps_to_show: Sequence[int],
    overlay_alpha: float = 0.5,
    *,
    t: Tensor | Sequence[float] | None = None,
    titles: bool = True,
    cmap: str = "viridis",
    interpolation: str = "nearest",
    panel_side: int | None = None,
) -> Tensor:
    """Figure 5a for one sample: the image, then the HFI map of each chosen step over it.

    Args:
        image: (3, H, W) float in [0, 1], the generated image.
        gates: (steps, S, S), this sample's gate maps (``GenerationOutput.gates[:, b]``).
        steps_to_show: step indices (negative ones count from the end, as in Python).
        overlay_alpha: panel = (1 - alpha) * image + alpha * colormap(map); 0 shows the image only,
            1 the colour map only.
        t: (steps,) the sampling grid; when given, titles read ``"step <i> t=<t_i>"``.
        titles: draw a title strip above the panels (PIL's default font).
        cmap: a ``matplotlib.colormaps`` name ("viridis", "jet", ...).
        interpolation: how the (S, S) maps are upsampled to the panel, "nearest" or "bilinear".
        panel_side: resize every panel to this side (image bilinear, maps with ``interpolation``);
            None keeps H x W.

    Maps are ``a = |g|`` rescaled jointly over the shown steps, ``(a - min) / (max - min)``
    (constant -> 0), so colours compare across steps.

    Returns:
        (3, H', W') float in [0, 1] on the CPU, white background. With ``n = len(steps_to_show)``,
        panels of ``h x w`` (``H x W`` or ``panel_side``) and padding ``p = FIGURE_PADDING``:
        ``H' = p + T + h + p`` and ``W' = (n + 1) (w + p) + p``, where ``T`` is the title strip
        height (0 without titles). Panel ``k`` (0 = the image) covers rows ``[p + T, p + T + h)``
        and columns ``[p + k (w + p), p + k (w + p) + w)``.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if gates.ndim != 3:
        raise ValueError(f"gates must be (steps, S, S) for one sample, got {tuple(gates.shape)}")
    if not 0.0 <= overlay_alpha <= 1.0:
        raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha}")
    if interpolation not in ("nearest", "bilinear"):
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    n_steps = gates.shape[0]
    chosen = []
    for i in steps_to_show:
        if not -n_steps <= i < n_steps:
            raise ValueError(f"step {i} out of range for {n_steps} denoising steps")
        chosen.append(i % n_steps)

    img = image.detach().float().cpu().clamp(0, 1)[None]
    size = (panel_side, panel_side) if panel_side is not None else tuple(img.shape[-2:])
    img = _resize(img, size, "bilinear").clamp(0, 1)[0]  # (3, h, w)
    panels = [img]
    if chosen:
        maps = _minmax(gates.detach().float().cpu().abs()[chosen])  # (n, S, S), joint over shown steps
        maps = _resize(maps[:, None], size, interpolation)[:, 0].clamp(0, 1)  # (n, h, w)
        colours = _colorize(maps, cmap)  # (n, 3, h, w)
        panels += list((1 - overlay_alpha) * img + overlay_alpha * colours)

    h, w, p = size[0], size[1], FIGURE_PADDING
    strip_h = _title_height() if titles else 0
    width = len(panels) * (w + p) + p
    fig = torch.ones(3, p + strip_h + h + p, width)
    for k, panel in enumerate(panels):
        x0 = p + k * (w + p)
        fig[:, p + strip_h : p + strip_h + h, x0 : x0 + w] = panel
    if titles:
        ts = None if t is None else [float(x) for x in t]
        if ts is not None and len(ts) != n_steps:
            raise ValueError(f"t has {len(ts)} values but gates has {n_steps} steps")
        names = ["image"] + [f"step {i}" + ("" if ts is None else f" t={ts[i]:.2f}") for i in chosen]
        fig[:, p : p + strip_h] = _title_strip(names, width, strip_h, w, p)
    return fig.clamp(0, 1)


def _title_height() -> int:
    from PIL import ImageFont

    font = ImageFont.load_default()
    return int(font.getbbox("Ag0=")[3]) + 3


# -- intensity plot ---------------------------------------------------------------------------
def intensity_plot(
    curve: Tensor,
    t: Tensor | Sequence[float] | None = None,
    *,
    ylabel: str = "normalised HFI intensity",
    title: str | None = "HFI intensity per denoising step",
    size: tuple[float, float] = (4.0, 3.0),
    dpi: int = 100,
) -> Tensor:
    """Figure 5b: a line plot of ``curve`` (steps,) against the step index, as (3, H, W) in [0, 1].

    Rendered with ``matplotlib.figure.Figure`` on an Agg canvas (no pyplot state).
    ``H = size[1] * dpi``, ``W = size[0] * dpi``. With ``t`` (steps,), a top axis labels some of
    the steps with their t values.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = curve.detach().float().cpu().reshape(-1).numpy()
    steps = len(y)
    if t is not None and len(t) != steps:
        raise ValueError(f"t has {len(t)} values but the curve has {steps} steps")
    fig = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(steps))
    ax.plot(x, y, marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("denoising step")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.5, max(steps - 1, 0) + 0.5)
    ax.grid(True, alpha=0.3)
    if t is not None:
        ticks = evenly_spaced_steps(steps, 6)
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        top.set_xticks(ticks)
        top.set_xticklabels([f"{float(t[i]):.2f}" for i in ticks], fontsize=7)
        top.set_xlabel("t", fontsize=8)
    elif title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    height, width = canvas.get_width_height()[::-1]
    return rgba.view(height, width, 4)[..., :3].permute(2, 0, 1).float() / 255.0


# -- gate maps on disk ------------------------------------------------------------------------
def save_gate_maps(gates: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
    """Write every step's map of every sample as an 8-bit grayscale PNG; returns the paths.

    gates (steps, B, S, S). For each sample ``b``, ``a = |g[:, b]|`` is min-max rescaled over all of
    its steps jointly (constant -> 0) to 0..255 and upscaled with nearest by
    ``k = ceil(64 / S)`` (1 when S >= 64), so files are ``(S k) x (S k)`` pixels, at least 64.
    Files are ``out_dir/{prefix}{b:02d}_step{i:03d}.png``, listed sample by sample, step by step.
    """
    from PIL import Image

    if gates.ndim != 4:
        raise ValueError(f"gates must be (steps, B, S, S), got {tuple(gates.shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps, batch, side = gates.shape[0], gates.shape[1], gates.shape[-1]
    k = max(1, math.ceil(MIN_SAVED_SIDE / side))
    paths: list[Path] = []
    for b in range(batch):
        maps = _minmax(gates[:, b].detach().float().cpu().abs())  # (steps, S, S)
        maps = (maps * 255).round().to(torch.uint8)
        maps = maps.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
        for i in range(steps):
            path = out / f"{prefix}{b:02d}_step{i:03d}.png"
            Image.fromarray(maps[i].numpy()).save(path)
            paths.append(path)
    return paths
