"""``DemoEvalCallback``: a cheaper ``cheers eval demo`` every N steps, and the hparams table at the end.

Every ``every_n_steps`` the callback runs :func:`cheers_pl.eval.demo_eval.evaluate` on the
model being trained with its own, smaller settings (``per_digit`` images per digit, ``steps``
Euler steps, ``max_reading`` questions of each kind, ``max_loss_samples`` samples per loss) and
logs ``eval/t2i_acc``, ``eval/read_digit_acc``, ``eval/read_number_acc``, ``eval/fm_heldout``,
``eval/prompt_sensitivity``, ``eval/image_sensitivity`` and ``eval/detail_ratio`` to every
TensorBoard logger. When training ends (after a last evaluation unless the last step already had
one) it writes the run's hyperparameters (the LightningModule's ``hparams``, flattened: the
spec, LR, ...) with those final metrics through ``logger.log_hyperparams(params, metrics)``:
TensorBoard's HPARAMS tab then lists runs side by side. (Lightning also writes the hparams once
at fit start with ``hp_metric``; set the logger's ``default_hp_metric: false`` to leave it out.)
With a :class:`~cheers_pl.callbacks.sensitivity.SensitivityCallback` in the same trainer, the
held-out losses and sensitivities are left to it (one value per tag and step) and its latest
values join the final metrics. With ``save_dir`` every evaluation's ``eval.json``, ``eval.md``
and ``t2i.png`` also go to ``save_dir/step{N:06d}/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cheers_pl.callbacks.sampling import FixedPromptCallback, eval_mode, fork_rng
from cheers_pl.callbacks.sensitivity import SensitivityCallback, data_root
from cheers_pl.distributed import full_params
from cheers_pl.eval.demo_eval import DemoData, EvalSettings, evaluate, scalars, write_report


class DemoEvalCallback(FixedPromptCallback):
    """The demo evaluation during training (see the module docstring).

    Args:
        every_n_steps: evaluate whenever ``trainer.global_step`` is a positive multiple of this.
        data: the demo data folder (default: the data module's ``root``, else ``data/demo``).
        per_digit, cfg_scale, steps, shift, seed: the T2I part (10 * per_digit images).
        max_reading: held-out questions of each kind (digits, numbers); None: all.
        max_loss_samples: held-out samples per loss; None: all.
        batch_size: loss and answer batch size.
        at_start: also evaluate at global step 0.
        log_hparams: write the hparams table with the final metrics when training ends.
        save_dir: also write each evaluation's report files under it.

    Attributes: ``last`` (the latest result dict, images dropped) and ``last_step``.
    """

    def __init__(self, every_n_steps: int = 200, data: str | None = None, per_digit: int = 2,
                 cfg_scale: float = 9.5, steps: int = 10, shift: float = 1.0, seed: int = 0,
                 max_reading: int | None = 20, max_loss_samples: int | None = 16, batch_size: int = 16,
                 at_start: bool = False, log_hparams: bool = True, save_dir: str | None = None):  # fmt: skip
        super().__init__(every_n_steps, ["-"], cfg_scale, steps, shift, seed, at_start)
        self.settings = EvalSettings(per_digit, cfg_scale, steps, shift, seed, batch_size,
                                     max_reading=max_reading, max_loss_samples=max_loss_samples)  # fmt: skip
        self.data, self.log_hparams, self.save_dir = data, log_hparams, save_dir
        self.last: dict[str, Any] = {}
        self._demo: DemoData | None = None
        self.disabled: str | None = None  # why the callback does nothing (no demo data)

    def demo(self, trainer: pl.Trainer) -> DemoData:
        if self._demo is None:
            self._demo = DemoData.load(data_root(trainer, self.data))
        return self._demo

    @staticmethod
    def sensitivity(trainer: pl.Trainer) -> SensitivityCallback | None:
        """The trainer's SensitivityCallback, if it has one."""
        return next((c for c in trainer.callbacks if isinstance(c, SensitivityCallback)), None)

    def wanted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Only with a TensorBoard logger and readable demo data (else one warning)."""
        if not super().wanted(trainer, pl_module) or self.disabled:
            return False
        try:
            self.demo(trainer)
        except (FileNotFoundError, ValueError) as err:
            self.disabled = str(err)
            rank_zero_warn(f"{type(self).__name__}: {err}; not evaluating")
            return False
        return True

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model, step = pl_module.model, trainer.global_step
        parts = ("t2i", "reading") if self.sensitivity(trainer) else ("t2i", "reading", "losses")
        with torch.no_grad(), eval_mode(model), fork_rng(model):
            result = evaluate(model, self.demo(trainer), self.settings, parts)
        self.last_step = step
        if trainer.is_global_zero and self.save_dir is not None:
            write_report({"step": step, **result}, Path(self.save_dir) / f"step{step:06d}")
        self.last = {k: v for k, v in result.items() if not k.startswith("_")}
        if trainer.is_global_zero:
            for logger in self.tensorboard_loggers(trainer):
                logger.log_metrics(scalars(self.last), step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A last evaluation (unless this step had one), then the hparams table with its metrics."""
        if not self.log_hparams or not self.wanted(trainer, pl_module):
            return
        sensitivity = self.sensitivity(trainer)
        with full_params(trainer):
            if self.last_step != trainer.global_step:
                self.run(trainer, pl_module)
            if (
                sensitivity is not None
                and sensitivity.last_step != trainer.global_step
                and (sensitivity.wanted(trainer, pl_module))
            ):
                sensitivity.run(trainer, pl_module)
        metrics = scalars({**self.last, **(sensitivity.last if sensitivity else {})})
        if trainer.is_global_zero:
            params = {**dict(pl_module.hparams), "trainer/max_steps": trainer.max_steps,
                      "trainer/global_step": trainer.global_step}  # fmt: skip
            for logger in self.tensorboard_loggers(trainer):
                # metrics under their own tags (hparams/...): the eval/* scalars keep one point per step
                final = {k.replace("eval/", "hparams/", 1): v for k, v in metrics.items()}
                logger.log_hyperparams(params, final, step=trainer.global_step)
