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

* **display scale.** Pictures show ``|g|`` on an absolute scale from 0 (no injection): heat-map
  figures map ``[0, vmax]`` to the colormap, ``vmax`` fixed or the largest ``|g|`` of the figure,
  with a colour bar printed beside the maps (never blended over the image); :func:`save_gate_maps`
  writes ``|g| / max |g|`` of each sample over all its steps. (A min-max stretch would turn a 1%
  spatial difference into the full colour range.)

matplotlib is imported lazily, inside the functions that draw with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cheers_pl.analysis.figures import FONT_SIZE, PAD, beside, colour_bar, labelled_grid, to_side

NORMALISE_MODES = ("minmax", "max", "none")
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
def _colorize(maps: Tensor, cmap: str) -> Tensor:
    """maps (..., H, W) in [0, 1] -> (..., 3, H, W) RGB float through a matplotlib colormap."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](maps.clamp(0, 1).cpu().numpy())  # (..., H, W, 4) float64
    return torch.from_numpy(rgba[..., :3]).float().movedim(-1, -3)


def _chosen(steps_to_show: Sequence[int], n_steps: int) -> list[int]:
    chosen = []
    for i in steps_to_show:
        if not -n_steps <= i < n_steps:
            raise ValueError(f"step {i} out of range for {n_steps} denoising steps")
        chosen.append(i % n_steps)
    return chosen


def heatmap_figure(
    images: Tensor,
    gates: Tensor,
    steps_to_show: Sequence[int],
    *,
    t: Tensor | Sequence[float] | None = None,
    prompts: Sequence[str] | None = None,
    cmap: str = "viridis",
    panel_side: int | None = 256,
    vmax: float | None = None,
    font_size: int = FONT_SIZE,
) -> Tensor:
    """Figure 5a: one row per sample, its decoded image then ``|g|`` of each chosen step; a colour bar beside.

    Args:
        images: (B, 3, H, W) float in [0, 1], the generated images.
        gates: (steps, B, S, S), ``GenerationOutput.gates``.
        steps_to_show: step indices (negative ones count from the end, as in Python).
        t: (steps,) the sampling grid; column titles then read ``"step <i>"`` and ``"t=<t_i>"``.
        prompts: B row labels (default ``"sample <b>"``), drawn left of each row.
        cmap: a ``matplotlib.colormaps`` name ("viridis", "magma", ...).
        panel_side: panel size: smaller images are enlarged by an integer factor (nearest), larger
            ones shrunk to it (bilinear); maps are always enlarged nearest-neighbour, one S x S cell
            per block. None keeps H x W.
        vmax: the colour scale is absolute, ``|g|`` from 0 (no injection) to ``vmax``, values above
            clipped; None takes the largest ``|g|`` of the shown maps (one scale per figure, printed
            on the bar).

    Returns:
        (3, H', W') float in [0, 1] on the CPU: :func:`~cheers_pl.analysis.figures.labelled_grid` of
        B rows and ``1 + len(steps_to_show)`` columns of ``h x w`` panels, then
        :func:`~cheers_pl.analysis.figures.colour_bar` (as tall as the panels) to its right, so
        ``W' = LABEL_WIDTH + (1 + n) (w + PAD) + PAD + PAD + bar width``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if gates.ndim != 4 or gates.shape[1] != images.shape[0]:
        raise ValueError(f"gates must be (steps, B, S, S), B = {images.shape[0]}; got {tuple(gates.shape)}")
    n_steps, batch = gates.shape[0], images.shape[0]
    chosen = _chosen(steps_to_show, n_steps)
    ts = None if t is None else [float(x) for x in t]
    if ts is not None and len(ts) != n_steps:
        raise ValueError(f"t has {len(ts)} values but gates has {n_steps} steps")
    if prompts is not None and len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for {batch} samples")

    img = to_side(images.clamp(0, 1), panel_side).clamp(0, 1)  # (B, 3, h, w)
    h, w = img.shape[-2:]
    maps = gates.detach().float().cpu().abs()[chosen].transpose(0, 1)  # (B, n, S, S)
    top = float(maps.max()) if maps.numel() else 0.0
    scale = vmax if vmax is not None else top
    if scale <= 0:
        scale = 1.0  # an all-zero gate (untrained, zero-initialised): every map at the bottom colour
    maps = F.interpolate((maps / scale).flatten(0, 1)[:, None], size=(h, w), mode="nearest")
    colours = _colorize(maps[:, 0], cmap).view(batch, len(chosen), 3, h, w)
    panels = torch.cat([img[:, None], colours], dim=1)  # (B, 1 + n, 3, h, w)
    heads = ["image"] + [f"step {i}" + ("" if ts is None else f" t={ts[i]:.2f}") for i in chosen]
    rows = list(prompts) if prompts is not None else [f"sample {b}" for b in range(batch)]
    grid = labelled_grid(panels, heads, rows, font_size=font_size)
    label = "|g|" + (" (clipped)" if vmax is not None and top > vmax else "")
    header = grid.shape[1] - batch * (h + PAD) - PAD
    bar = colour_bar(batch * (h + PAD) - PAD, 0.0, scale, cmap, label, font_size=font_size)
    return beside(grid, bar, top=header + PAD).clamp(0, 1)


# -- intensity plot ---------------------------------------------------------------------------
def _canvas_to_tensor(canvas) -> Tensor:
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    height, width = canvas.get_width_height()[::-1]
    return rgba.view(height, width, 4)[..., :3].permute(2, 0, 1).float() / 255.0


def _top_t_axis(ax, t: Sequence[float], steps: int) -> None:
    ticks = evenly_spaced_steps(steps, 6)
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks(ticks)
    top.set_xticklabels([f"{float(t[i]):.2f}" for i in ticks], fontsize=7)
    top.set_xlabel("t", fontsize=8)


def intensity_plot(
    curve: Tensor,
    t: Tensor | Sequence[float] | None = None,
    *,
    per_run: Tensor | None = None,
    labels: Sequence[str] | None = None,
    ylabel: str = "normalised HFI intensity",
    title: str | None = "HFI intensity per denoising step",
    size: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Tensor:
    """Figure 5b: ``curve`` (steps,) against the denoising step, as one (3, H, W) picture in [0, 1].

    With ``per_run`` (steps, B), the raw intensities :func:`intensity` of each run, a second panel
    on the left shows them on their absolute scale (mean ``|g|``, one line per run, ``labels`` in the
    legend), so the normalised curve on the right can be read against real gate values.
    Rendered with ``matplotlib.figure.Figure`` on an Agg canvas (no pyplot state).
    ``H = size[1] * dpi``, ``W = size[0] * dpi``; ``size`` defaults to (4, 3) inches, (8, 3) with
    ``per_run``. With ``t`` (steps,), a top axis labels some of the steps with their t values.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = curve.detach().float().cpu().reshape(-1).numpy()
    steps = len(y)
    if t is not None and len(t) != steps:
        raise ValueError(f"t has {len(t)} values but the curve has {steps} steps")
    if per_run is not None and per_run.shape[0] != steps:
        raise ValueError(f"per_run has {per_run.shape[0]} steps but the curve has {steps}")
    size = size or ((8.0, 3.0) if per_run is not None else (4.0, 3.0))
    fig = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    x = list(range(steps))
    axes = []
    if per_run is not None:
        ax = fig.add_subplot(1, 2, 1)
        runs = per_run.detach().float().cpu()
        for b in range(runs.shape[1]):
            name = labels[b] if labels is not None else f"sample {b}"
            ax.plot(x, runs[:, b].numpy(), linewidth=1, label=name if len(name) <= 28 else name[:27] + "…")
        ax.set_ylabel("mean |g| (absolute)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=6, loc="best")
        axes.append(ax)
    ax = fig.add_subplot(1, 2 if per_run is not None else 1, 2 if per_run is not None else 1)
    ax.plot(x, y, marker="o", markersize=3, linewidth=1.5)
    ax.set_ylabel(ylabel)
    axes.append(ax)
    for a in axes:
        a.set_xlabel("denoising step")
        a.set_xlim(-0.5, max(steps - 1, 0) + 0.5)
        a.grid(True, alpha=0.3)
        if t is not None:
            _top_t_axis(a, t, steps)
    if title and (t is not None or per_run is not None):
        fig.suptitle(title, fontsize=9)
    elif title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _canvas_to_tensor(canvas)


# -- gate maps on disk ------------------------------------------------------------------------
def save_gate_maps(gates: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
    """Write every step's map of every sample as an 8-bit grayscale PNG; returns the paths.

    gates (steps, B, S, S). For each sample ``b``, ``a = |g[:, b]|`` is divided by its largest value
    over all of its steps (0 stays black; an all-zero sample is all black), scaled to 0..255 and
    upscaled with nearest by ``k = ceil(64 / S)`` (1 when S >= 64), so files are ``(S k) x (S k)``
    pixels, at least 64. Files are ``out_dir/{prefix}{b:02d}_step{i:03d}.png``, listed sample by
    sample, step by step.
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
        maps = gates[:, b].detach().float().cpu().abs()  # (steps, S, S)
        maps = maps / maps.max() if maps.max() > 0 else maps
        maps = (maps * 255).round().to(torch.uint8)
        maps = maps.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
        for i in range(steps):
            path = out / f"{prefix}{b:02d}_step{i:03d}.png"
            Image.fromarray(maps[i].numpy()).save(path)
            paths.append(path)
    return paths
