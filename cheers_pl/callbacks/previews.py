"""``PreviewCallback``: periodic text-to-image samples and D(z1) reconstructions in TensorBoard.

Every ``every_n_steps`` optimizer steps (and once before the first step when ``at_start``), the
callback (sampling on every rank, as sharded strategies need; logging on global rank 0 only)

1. generates one image per fixed prompt with ``pl_module.model.generate`` (eval mode, no grad,
   its own seeded generator; the global RNG state and every module's training flag are restored);
2. reconstructs a fixed set of training images through the pixel decoder, D(VAE.encode(x)),
   unless the model runs the latent ablation (``pixel_decoder is None``);
3. logs both grids (``previews/generated``, ``previews/reconstruction``) and the scalar
   ``previews/reconstruction_mse`` to every :class:`TensorBoardLogger` of the trainer, and saves
   PNGs to ``save_dir`` when given.

Grids are (3, H', W') float in [0, 1] from :func:`torchvision.utils.make_grid` with padding 2:
for ``n`` images of side ``s`` laid out ``nrow`` per row, ``H' = rows * (s + 2) + 2`` and
``W' = nrow * (s + 2) + 2``. The generated grid is one row of ``len(prompts)`` images; the
reconstruction grid has the inputs on the top row and their reconstructions below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from cheers_pl.callbacks.sampling import FixedPromptCallback, eval_mode, fork_rng

GRID_PADDING = 2


class PreviewCallback(FixedPromptCallback):
    """Log generated images and pixel-decoder reconstructions of the wrapped ``CheersModel``.

    The LightningModule must expose the ``CheersModel`` as ``pl_module.model``.

    Args:
        every_n_steps: preview whenever ``trainer.global_step`` is a positive multiple of this.
        prompts: captions generated at each preview (default: ``sampling.DEFAULT_PROMPTS``).
        cfg_scale, steps, shift, seed: passed to ``CheersModel.generate``; the fixed seed makes
            successive previews comparable.
        num_reconstructions: images kept from the first training batch that has ``images``
            (0 disables reconstructions).
        at_start: also preview at global step 0, before the first optimizer step (the untrained
            model).
        save_dir: if set, also write ``generated_step{step:06d}.png`` and
            ``reconstruction_step{step:06d}.png`` there.

    Attributes (after a preview):
        last_generated: (3, H', W') grid of the latest generated images.
        last_reconstruction: (3, H', W') grid, inputs on top, reconstructions below; or None.
        last_reconstruction_mse: mean squared error between inputs and reconstructions; or None.
        last_step: global step of the latest preview; or None.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        prompts: list[str] | None = None,
        cfg_scale: float = 4.0,
        steps: int = 20,
        shift: float = 1.0,
        seed: int = 0,
        num_reconstructions: int = 4,
        at_start: bool = True,
        save_dir: str | None = None,
    ):
        super().__init__(every_n_steps, prompts, cfg_scale, steps, shift, seed, at_start)
        if num_reconstructions < 0:
            raise ValueError(f"num_reconstructions must be >= 0, got {num_reconstructions}")
        self.num_reconstructions = num_reconstructions
        self.save_dir = save_dir

        self.reference_images: Tensor | None = None  # (n, 3, H, W) on CPU, float in [0, 1]
        self.last_generated: Tensor | None = None
        self.last_reconstruction: Tensor | None = None
        self.last_reconstruction_mse: float | None = None
        self._said_latent = False

    # -- cadence (FixedPromptCallback) -----------------------------------------------------------
    def observe(self, batch) -> None:
        self.remember_images(batch)

    def wanted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """With no TensorBoard logger, still preview when PNGs go to ``save_dir``."""
        return super().wanted(trainer, pl_module) or self.save_dir is not None

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.preview(trainer, pl_module)

    # -- the preview --------------------------------------------------------------------------
    def remember_images(self, batch) -> None:
        """Store the first ``num_reconstructions`` images (n,3,H,W) of the first batch that has any."""
        if self.reference_images is not None or self.num_reconstructions == 0:
            return
        images = batch.get("images") if isinstance(batch, Mapping) else None
        if images is None or images.shape[0] == 0:
            return
        self.reference_images = images[: self.num_reconstructions].detach().float().cpu().clone()

    def preview(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Generate, reconstruct, log and save at ``trainer.global_step``; sets the ``last_*`` attributes.

        Runs wherever it is called (no step or rank check); the hooks decide when.
        """
        model, step = pl_module.model, trainer.global_step
        with torch.no_grad(), eval_mode(model), fork_rng(model):
            self.last_generated = self.generated_grid(model)
            recon = self.reconstruction_grid(model)
        self.last_reconstruction, self.last_reconstruction_mse = recon if recon else (None, None)
        self.last_step = step
        if trainer.is_global_zero:
            self._log(trainer, step)
            self._save(step)

    def generated_grid(self, model: nn.Module) -> Tensor:
        """(3, H', W') grid of one generated image per prompt, all on one row."""
        out = model.generate(
            self.prompts, cfg_scale=self.cfg_scale, steps=self.steps, shift=self.shift, seed=self.seed
        )
        return _grid(out.images, nrow=len(self.prompts))

    def reconstruction_grid(self, model: nn.Module) -> tuple[Tensor, float] | None:
        """(grid (3, H', W'): inputs on top, D(z1) below; mse) or None when there is nothing to show."""
        if model.pixel_decoder is None:
            if not self._said_latent:
                rank_zero_info(
                    "PreviewCallback: the model has no pixel decoder (pixel_reconstruct='latent'); "
                    "skipping reconstructions"
                )
                self._said_latent = True
            return None
        if self.reference_images is None:
            return None
        x = self.reference_images.to(model.placeholder_ids.device)
        recon = model.pixel_decoder(model.vae.encode(x)).float().clamp(0, 1)
        mse = float(torch.mean((recon - x) ** 2))
        return _grid(torch.cat([x, recon]), nrow=x.shape[0]), mse

    # -- output -------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, step: int) -> None:
        for logger in self.tensorboard_loggers(trainer):
            logger.experiment.add_image("previews/generated", self.last_generated, step)
            if self.last_reconstruction is not None:
                logger.experiment.add_image("previews/reconstruction", self.last_reconstruction, step)
                logger.log_metrics({"previews/reconstruction_mse": self.last_reconstruction_mse}, step)

    def _save(self, step: int) -> None:
        if self.save_dir is None:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        save_image(self.last_generated, os.path.join(self.save_dir, f"generated_step{step:06d}.png"))
        if self.last_reconstruction is not None:
            path = os.path.join(self.save_dir, f"reconstruction_step{step:06d}.png")
            save_image(self.last_reconstruction, path)


def _grid(images: Tensor, nrow: int) -> Tensor:
    """images (N,3,H,W) -> (3, H', W') float CPU grid in [0, 1], ``nrow`` images per row, padding 2."""
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=GRID_PADDING)
