"""``SensitivityCallback``: does the model use its input? Two cheap diagnostics every N steps.

Logs to every TensorBoard logger (issue 12; :mod:`cheers_pl.eval.heldout` has the definitions):

* ``eval/fm_heldout``: the flow-matching loss of held-out generation samples (fixed noise and t);
* ``eval/prompt_sensitivity``: that loss with the prompts shuffled across the samples minus with
  the true prompts;
* ``eval/image_sensitivity``: the held-out text loss of understanding samples with the images
  shuffled across the samples minus with the true images.

Both sensitivities are ~0 for a model that ignores its prompt / image and clearly above 0 for one
that uses it. The samples are read once, from ``data`` (default: the data module's ``root``, else
``data/demo``): ``heldout/`` (generation) and ``heldout_understanding/``, ``samples`` of each
evenly spaced. Cost: four forward passes over ``samples`` samples each (no sampling). Where
those folders do not exist (a paper-size run's data root) it warns once and does nothing.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cheers_pl.callbacks.sampling import FixedPromptCallback, eval_mode, fork_rng
from cheers_pl.data.schema import Sample
from cheers_pl.eval.heldout import image_sensitivity, prompt_sensitivity, read_samples, spread

DEFAULT_DATA = "data/demo"
HELDOUT, HELDOUT_UND = "heldout", "heldout_understanding"


def data_root(trainer: pl.Trainer, data: str | None) -> Path:
    """``data`` if given, else the data module's ``root`` when it has one, else ``data/demo``."""
    if data is not None:
        return Path(data)
    root = getattr(getattr(trainer, "datamodule", None), "root", None)
    return Path(root) if root else Path(DEFAULT_DATA)


class SensitivityCallback(FixedPromptCallback):
    """Log ``eval/fm_heldout``, ``eval/prompt_sensitivity`` and ``eval/image_sensitivity``.

    Args:
        every_n_steps: run whenever ``trainer.global_step`` is a positive multiple of this.
        data: the demo data folder holding ``heldout/`` and ``heldout_understanding/``.
        samples: held-out samples of each kind used (evenly spaced over the folder).
        batch_size: samples per forward pass.
        seed: the noise / t of the held-out losses and the shuffle.
        at_start: also run at global step 0 (the untrained model).

    Attributes: ``last`` (the latest values, a dict) and ``last_step``.
    """

    def __init__(self, every_n_steps: int = 50, data: str | None = None, samples: int = 16,
                 batch_size: int = 8, seed: int = 0, at_start: bool = True):  # fmt: skip
        super().__init__(every_n_steps, ["-"], 1.0, 1, 1.0, seed, at_start)
        if samples < 2:
            raise ValueError(f"samples must be >= 2 (a shuffle needs two), got {samples}")
        self.data, self.samples, self.batch_size = data, samples, batch_size
        self.last: dict[str, float] = {}
        self._held: tuple[list[Sample], list[Sample]] | None = None
        self.disabled: str | None = None  # why the callback does nothing (no held-out data)

    def held(self, trainer: pl.Trainer) -> tuple[list[Sample], list[Sample]]:
        """(generation, understanding) held-out samples, read on first use."""
        if self._held is None:
            root = data_root(trainer, self.data)
            gen = read_samples(root / HELDOUT, task="generation")
            und = read_samples(root / HELDOUT_UND, task="understanding")
            self._held = spread(gen, self.samples), spread(und, self.samples)
        return self._held

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The three values (and the true/shuffled losses they come from) for the current weights."""
        gen, und = self.held(trainer)
        model = pl_module.model
        with torch.no_grad(), eval_mode(model), fork_rng(model):
            out = prompt_sensitivity(model, gen, self.batch_size, self.seed)
            out.update(image_sensitivity(model, und, self.batch_size, self.seed))
        return out

    def wanted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Only with a TensorBoard logger and readable held-out data (else one warning)."""
        if not super().wanted(trainer, pl_module) or self.disabled:
            return False
        try:
            self.held(trainer)
        except (FileNotFoundError, ValueError) as err:
            self.disabled = str(err)
            rank_zero_warn(f"{type(self).__name__}: {err}; not measuring")
            return False
        return True

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last, self.last_step = self.measure(trainer, pl_module), trainer.global_step
        if trainer.is_global_zero:
            names = ("fm_heldout", "prompt_sensitivity", "image_sensitivity", "text_heldout")
            metrics = {f"eval/{k}": self.last[k] for k in names}
            for logger in self.tensorboard_loggers(trainer):
                logger.log_metrics(metrics, trainer.global_step)
