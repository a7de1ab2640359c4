"""``HFIHeatmapCallback``: HFI gate heat maps and per-step intensity in TensorBoard (Figure 5).

On the same cadence as :class:`~cheers_pl.callbacks.previews.PreviewCallback` (every
``every_n_steps`` optimizer steps, and once before the first step when ``at_start``; at most once
per global step), the callback samples the fixed prompts with
``pl_module.model.generate(..., return_gates=True)`` on every rank (eval mode, no grad, its own
seeded generator; RNG state and training flags restored) and, on global rank 0, logs to every
:class:`TensorBoardLogger`:

* image ``hfi/heatmaps``: one :func:`~cheers_pl.analysis.hfi.heatmap_figure` per prompt (the
  generated image, then the |g| maps of ``show_steps`` over it), stacked vertically;
* image ``hfi/intensity``: :func:`~cheers_pl.analysis.hfi.intensity_plot` of the
  :func:`~cheers_pl.analysis.hfi.intensity_curve` over all prompts (per-run ``normalise``, then
  averaged across prompts at each step);
* scalars ``hfi/intensity/step_{i:02d}``, that curve's value at every denoising step ``i``.

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
    intensity_curve,
    intensity_plot,
)
from cheers_pl.callbacks.sampling import FixedPromptCallback, eval_mode, fork_rng


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
        overlay_alpha, cmap: blending and colormap of the heat maps.
        panel_side: side of every panel of the heat-map figure (None: the image size).

    Attributes (after a log):
        last_gates: (steps, B, S, S) float CPU gates of the latest sampling, B = len(prompts).
        last_curve: (steps,) the normalised intensity curve.
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
        overlay_alpha: float = 0.5,
        cmap: str = "viridis",
        panel_side: int | None = 256,
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
        self.overlay_alpha, self.cmap, self.panel_side = overlay_alpha, cmap, panel_side

        self.last_gates: Tensor | None = None
        self.last_curve: Tensor | None = None
        self.last_t: Tensor | None = None
        self.last_heatmaps: Tensor | None = None
        self.last_plot: Tensor | None = None
        self._said_no_gate = False

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
        if trainer.is_global_zero:
            images = out.images.detach().float().cpu()
            self.last_heatmaps = self.heatmaps(images, self.last_gates, self.last_t)
            self.last_plot = intensity_plot(self.last_curve, self.last_t)
            self._log(trainer, step)

    def heatmaps(self, images: Tensor, gates: Tensor, t: Tensor | None) -> Tensor:
        """images (B,3,H,W), gates (steps,B,S,S) -> one heat-map figure per sample, stacked vertically."""
        figures = [
            heatmap_figure(
                images[b],
                gates[:, b],
                self.show_steps,
                self.overlay_alpha,
                t=t,
                cmap=self.cmap,
                panel_side=self.panel_side,
            )
            for b in range(images.shape[0])
        ]
        return torch.cat(figures, dim=1)

    # -- output -------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, step: int) -> None:
        scalars = {f"hfi/intensity/step_{i:02d}": float(v) for i, v in enumerate(self.last_curve)}
        for logger in self.tensorboard_loggers(trainer):
            logger.experiment.add_image("hfi/heatmaps", self.last_heatmaps, step)
            logger.experiment.add_image("hfi/intensity", self.last_plot, step)
            logger.log_metrics(scalars, step=step)

    def _say_no_gate(self) -> None:
        if not self._said_no_gate:
            rank_zero_info("HFIHeatmapCallback: the model has no HFI gate (hfi='none'); nothing to log")
            self._said_no_gate = True
