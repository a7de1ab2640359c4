"""``HFIHeatmapCallback``: HFI gate heat maps and per-step intensity in TensorBoard (Figure 5).

On the same cadence as :class:`~cheers_pl.callbacks.previews.PreviewCallback` (every
``every_n_steps`` optimizer steps, and once before the first step when ``at_start``; at most once
per global step), the callback samples the fixed prompts with
``pl_module.model.generate(..., return_gates=True)`` on every rank (eval mode, no grad, its own
seeded generator; RNG state and training flags restored) and, on global rank 0, logs to every
:class:`TensorBoardLogger`:

* image ``hfi/heatmaps``: :func:`~cheers_pl.analysis.hfi.heatmap_figure`, one row per prompt
  (the prompt, the generated image, then the |g| maps of ``show_steps`` beside it, enlarged
  nearest-neighbour to ``panel_side``) and a colour bar with the absolute |g| scale (0 to
  ``vmax``, or to the figure's largest |g|, printed on the bar);
* image ``hfi/intensity``: :func:`~cheers_pl.analysis.hfi.intensity_plot`, the raw mean |g| of
  every prompt per denoising step and the :func:`~cheers_pl.analysis.hfi.intensity_curve` over
  all prompts (per-run ``normalise``, then averaged across prompts at each step): one chart per
  logging step, stepped through with TensorBoard's image slider;
* scalars ``hfi/intensity/{first,mean,last}`` (mean |g| over the prompts at the first step, over
  all steps, at the last step) and ``hfi/intensity/peak_t`` (the t where the normalised curve
  peaks), grouped with the training-time ``hfi/gate_*`` scalars in one TensorBoard custom-scalars
  layout (category "HFI"), written once per logger. The whole curve is the picture; a scalar per
  denoising step (80 tags at paper settings) would plot each step against the *training* step.

Both images carry a TensorBoard description (the prompts, what rows, columns and scales are).

With ``model.spec.hfi == "none"`` there is no gate: the callback says so once and does nothing.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cheers_pl.analysis.hfi import (
    NORMALISE_MODES,
    evenly_spaced_steps,
    heatmap_figure,
    intensity,
    intensity_curve,
    intensity_plot,
)
from cheers_pl.callbacks.sampling import FixedPromptCallback, eval_mode, fork_rng, log_image, prompt_list

LAYOUT = {
    "HFI": {
        "sampled gate |g| (first, mean, last denoising step)": [
            "Multiline",
            ["hfi/intensity/first", "hfi/intensity/mean", "hfi/intensity/last"],
        ],
        "t of peak normalised intensity": ["Multiline", ["hfi/intensity/peak_t"]],
        "gate during training": ["Multiline", ["hfi/gate_mean", "hfi/gate_abs_mean", "hfi/gate_std"]],
    }
}


class HFIHeatmapCallback(FixedPromptCallback):
    """Log HFI heat maps and the per-step HFI intensity of the wrapped ``CheersModel``.

    The LightningModule must expose the ``CheersModel`` as ``pl_module.model``.

    Args:
        every_n_steps: log whenever ``trainer.global_step`` is a positive multiple of this.
        prompts: captions sampled each time (default: the PreviewCallback prompts).
        cfg_scale, steps, shift, seed: passed to ``CheersModel.generate``; the fixed seed makes
            successive maps comparable.
        show_steps: denoising steps drawn in the heat-map figure (negative counts from the end);
            default: 5 evenly spaced steps, the first and the last included.
        normalise: per-run normalisation of the intensity curve, one of ``NORMALISE_MODES``
            ("minmax", "max", "none"); see :func:`~cheers_pl.analysis.hfi.normalise_per_run`.
        at_start: also log at global step 0, before the first optimizer step.
        cmap: colormap of the heat maps (a ``matplotlib.colormaps`` name).
        panel_side: side of every panel of the heat-map figure: smaller images are enlarged by an
            integer factor (nearest), larger ones shrunk (None: the image size).
        vmax: top of the absolute |g| colour scale (values above are clipped and the bar says so);
            None: the largest |g| of each figure, printed on its colour bar.

    Attributes (after a log):
        last_gates: (steps, B, S, S) float CPU gates of the latest sampling, B = len(prompts).
        last_curve: (steps,) the normalised intensity curve.
        last_intensity: (steps, B) the raw mean |g| of every map.
        last_t: (steps,) the sampling grid.
        last_heatmaps, last_plot: the logged (3, H, W) images (global rank 0 only).
        last_step: global step of the latest sampling; or None.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        prompts: list[str] | None = None,
        cfg_scale: float = 4.0,
        steps: int = 20,
        shift: float = 1.0,
        seed: int = 0,
        show_steps: list[int] | None = None,
        normalise: str = "minmax",
        at_start: bool = True,
        cmap: str = "viridis",
        panel_side: int | None = 256,
        vmax: float | None = None,
    ):
        super().__init__(every_n_steps, prompts, cfg_scale, steps, shift, seed, at_start)
        if normalise not in NORMALISE_MODES:
            raise ValueError(
                f"normalise must be one of {', '.join(map(repr, NORMALISE_MODES))}; got {normalise!r}"
            )
        self.show_steps = list(show_steps) if show_steps is not None else evenly_spaced_steps(steps, 5)
        bad = [i for i in self.show_steps if not -steps <= i < steps]
        if bad:
            raise ValueError(f"show_steps {bad} out of range for {steps} denoising steps")
        self.normalise = normalise
        if vmax is not None and vmax <= 0:
            raise ValueError(f"vmax must be > 0 or None, got {vmax}")
        self.cmap, self.panel_side, self.vmax = cmap, panel_side, vmax

        self.last_gates: Tensor | None = None
        self.last_curve: Tensor | None = None
        self.last_intensity: Tensor | None = None
        self.last_t: Tensor | None = None
        self.last_heatmaps: Tensor | None = None
        self.last_plot: Tensor | None = None
        self._said_no_gate = False
        self._layouts: set[int] = set()  # ids of the writers that have the custom-scalars layout

    # -- cadence (FixedPromptCallback) -----------------------------------------------------------
    def wanted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Nothing to do without a gate (``hfi: none``) or a TensorBoard logger."""
        if getattr(pl_module.model.spec, "hfi", "gated") == "none":
            self._say_no_gate()
            return False
        return super().wanted(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_heatmaps(trainer, pl_module)

    # -- the work -----------------------------------------------------------------------------
    def log_heatmaps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sample, compute the curve, and (on global rank 0) draw and log at ``trainer.global_step``.

        Runs wherever it is called (no step or rank check); the hooks decide when.
        """
        model, step = pl_module.model, trainer.global_step
        with torch.no_grad(), eval_mode(model), fork_rng(model):
            out = model.generate(
                self.prompts,
                cfg_scale=self.cfg_scale,
                steps=self.steps,
                shift=self.shift,
                seed=self.seed,
                return_gates=True,
            )
        self.last_step = step
        if out.gates is None:
            self._say_no_gate()
            return
        self.last_gates = out.gates.detach().float().cpu()
        self.last_t = out.t.detach().float().cpu() if out.t is not None else None
        self.last_curve = intensity_curve(self.last_gates, self.normalise)
        self.last_intensity = intensity(self.last_gates)
        if trainer.is_global_zero:
            images = out.images.detach().float().cpu()
            self.last_heatmaps = self.heatmaps(images, self.last_gates, self.last_t)
            self.last_plot = intensity_plot(
                self.last_curve,
                self.last_t,
                per_run=self.last_intensity,
                labels=self.prompts,
                ylabel=f"intensity, per-run {self.normalise}",
            )
            self._log(trainer, step)

    def heatmaps(self, images: Tensor, gates: Tensor, t: Tensor | None) -> Tensor:
        """images (B,3,H,W), gates (steps,B,S,S) -> the (3, H', W') heat-map figure, a row per prompt."""
        return heatmap_figure(
            images, gates, self.show_steps, t=t, prompts=self.prompts, cmap=self.cmap,
            panel_side=self.panel_side, vmax=self.vmax,
        )  # fmt: skip

    def summary_scalars(self) -> dict[str, float]:
        """``hfi/intensity/{first,mean,last,peak_t}`` of the latest sampling (see the module docstring)."""
        per_step = self.last_intensity.mean(dim=1)  # (steps,) mean |g| over the prompts
        peak = int(self.last_curve.argmax())
        peak_t = float(self.last_t[peak]) if self.last_t is not None else peak / max(len(per_step) - 1, 1)
        return {
            "hfi/intensity/first": float(per_step[0]),
            "hfi/intensity/mean": float(per_step.mean()),
            "hfi/intensity/last": float(per_step[-1]),
            "hfi/intensity/peak_t": peak_t,
        }

    def descriptions(self) -> dict[str, str]:
        """TensorBoard descriptions (markdown) of ``hfi/heatmaps`` and ``hfi/intensity``."""
        scale = f"fixed, 0 to {self.vmax}" if self.vmax is not None else "0 to the figure's largest |g|"
        sampling = f"CFG {self.cfg_scale}, {self.steps} steps, shift {self.shift}, seed {self.seed}"
        return {
            "hfi/heatmaps": f"HFI gate maps |g| (paper Fig. 5a), {sampling}. One row per prompt: the "
            f"generated image, then |g| at denoising steps {self.show_steps} (one cell per latent "
            f"token, nearest-neighbour). Colour bar: absolute |g| ({scale}).\n\n" + prompt_list(self.prompts),
            "hfi/intensity": f"HFI intensity per denoising step (paper Fig. 5b), {sampling}. Left: mean "
            f"|g| of each prompt's map (absolute). Right: per-run {self.normalise}-normalised intensity "
            "averaged over the prompts.\n\n" + prompt_list(self.prompts),
        }

    # -- output -------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, step: int) -> None:
        about, scalars = self.descriptions(), self.summary_scalars()
        for logger in self.tensorboard_loggers(trainer):
            writer = logger.experiment
            if id(writer) not in self._layouts:
                writer.add_custom_scalars(LAYOUT)
                self._layouts.add(id(writer))
            log_image(writer, "hfi/heatmaps", self.last_heatmaps, step, about["hfi/heatmaps"])
            log_image(writer, "hfi/intensity", self.last_plot, step, about["hfi/intensity"])
            logger.log_metrics(scalars, step=step)

    def _say_no_gate(self) -> None:
        if not self._said_no_gate:
            rank_zero_info("HFIHeatmapCallback: the model has no HFI gate (hfi='none'); nothing to log")
            self._said_no_gate = True
