"""``PreviewCallback``: periodic text-to-image samples and D(z1) reconstructions in TensorBoard.

Every ``every_n_steps`` optimizer steps (and once before the first step when ``at_start``), the
callback (sampling on every rank, as sharded strategies need; logging on global rank 0 only)

1. generates one image per fixed prompt with ``pl_module.model.generate`` (eval mode, no grad,
   its own seeded generator; the global RNG state and every module's training flag are restored);
2. reconstructs a fixed set of training images through the pixel decoder, D(VAE.encode(x)),
   unless the model runs the latent ablation (``pixel_decoder is None``);
3. logs both pictures (``previews/generated``, ``previews/reconstruction``, each with a
   TensorBoard description: the prompts, the sampling settings, what the rows are) and the scalar
   ``previews/reconstruction_mse`` to every :class:`TensorBoardLogger` of the trainer, and saves
   the same pictures as PNGs to ``save_dir`` when given.

Pictures are (3, H', W') float in [0, 1] from :func:`~cheers_pl.analysis.figures.labelled_grid`:
every image enlarged nearest-neighbour by the integer factor ``k`` that brings its side ``s`` to
at least ``display_side`` (``k = ceil(display_side / s)``, 1 when already that large; panels of
``S = s k``), the labels drawn into the picture. The generated picture is one row, "generated",
of ``len(prompts)`` panels under their prompts; the reconstruction picture has the row "input"
above the row "reconstruction", one column per remembered training image. With header height
``T`` and label strip ``L = LABEL_WIDTH``: ``H' = T + rows (S + 2) + 2``, ``W' = L + cols (S + 2) + 2``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchvision.utils import save_image

from cheers_pl.analysis.figures import labelled_grid, upscale
from cheers_pl.callbacks.sampling import FixedPromptCallback, eval_mode, fork_rng, log_image, prompt_list


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
        display_side: enlarge images (nearest, integer factor) to at least this many pixels a
            side in the pictures; None keeps their size.

    Attributes (after a preview):
        last_generated: (3, H', W') labelled picture of the latest generated images.
        last_reconstruction: (3, H', W') picture, inputs on top, reconstructions below; or None.
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
        display_side: int | None = 256,
    ):
        super().__init__(every_n_steps, prompts, cfg_scale, steps, shift, seed, at_start)
        if display_side is not None and display_side < 1:
            raise ValueError(f"display_side must be >= 1 or None, got {display_side}")
        self.display_side = display_side
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
        """(3, H', W') picture of one generated image per prompt on one row, each under its prompt."""
        out = model.generate(
            self.prompts, cfg_scale=self.cfg_scale, steps=self.steps, shift=self.shift, seed=self.seed
        )
        return self._picture(out.images[None], self.prompts, ["generated"])

    def reconstruction_grid(self, model: nn.Module) -> tuple[Tensor, float] | None:
        """(picture (3, H', W'): inputs on top, D(z1) below; mse) or None when there is nothing to show."""
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
        heads = [f"training image {i}" for i in range(x.shape[0])]
        return self._picture(torch.stack([x, recon]), heads, ["input", "reconstruction D(z1)"]), mse

    def _picture(self, images: Tensor, heads: list[str], rows: list[str]) -> Tensor:
        """images (R, C, 3, H, W) -> enlarged to ``display_side``, labelled, (3, H', W') on the CPU."""
        r, c = images.shape[:2]
        big = upscale(images.detach().float().clamp(0, 1).flatten(0, 1), self.display_side)
        return labelled_grid(big.unflatten(0, (r, c)), heads, rows)

    def descriptions(self) -> dict[str, str]:
        """TensorBoard descriptions (markdown) of the two pictures."""
        sampling = f"CFG {self.cfg_scale}, {self.steps} steps, shift {self.shift}, seed {self.seed}"
        return {
            "previews/generated": f"One image per prompt, left to right ({sampling}):\n\n"
            + prompt_list(self.prompts),
            "previews/reconstruction": "Top row: training images (the first batch's); bottom row: "
            "their reconstructions through the pixel decoder, D(VAE.encode(x)). "
            "MSE: `previews/reconstruction_mse`.",
        }

    # -- output -------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, step: int) -> None:
        about = self.descriptions()
        for logger in self.tensorboard_loggers(trainer):
            writer = logger.experiment
            log_image(writer, "previews/generated", self.last_generated, step, about["previews/generated"])
            if self.last_reconstruction is not None:
                tag = "previews/reconstruction"
                log_image(writer, tag, self.last_reconstruction, step, about[tag])
                logger.log_metrics({"previews/reconstruction_mse": self.last_reconstruction_mse}, step)

    def _save(self, step: int) -> None:
        if self.save_dir is None:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        save_image(self.last_generated, os.path.join(self.save_dir, f"generated_step{step:06d}.png"))
        if self.last_reconstruction is not None:
            path = os.path.join(self.save_dir, f"reconstruction_step{step:06d}.png")
            save_image(self.last_reconstruction, path)
