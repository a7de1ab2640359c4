"""``FixedPromptCallback``: the cadence and plumbing the sampling callbacks share.

Every ``every_n_steps`` optimizer steps (and once before the first step when ``at_start``; at
most once per global step, which does not advance during gradient accumulation) the subclass's
:meth:`FixedPromptCallback.run` is called on every rank (under FSDP or DeepSpeed the forward
passes are collective: a rank-0-only sample would hang); subclasses log on global rank 0 only.
Sampling helpers restore every module's training flag and the global RNG state;
:func:`log_image` writes a picture with a TensorBoard description (the prompts, what the rows are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cheers_pl.distributed import full_params

DEFAULT_PROMPTS = (
    "a photo of a tabby cat",
    "a cup of coffee on a red saucer with a spoon, on a wooden table",
    "a handwritten digit 3 in white on black",
    "a handwritten digit 7 in white on black",
)


class FixedPromptCallback(pl.Callback):
    """Base of callbacks that sample fixed prompts from ``pl_module.model`` (a ``CheersModel``)."""

    def __init__(self, every_n_steps: int, prompts: list[str] | None, cfg_scale: float, steps: int,
                 shift: float, seed: int, at_start: bool):  # fmt: skip
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        if not self.prompts:
            raise ValueError("prompts must not be empty")
        self.every_n_steps, self.at_start = every_n_steps, at_start
        self.cfg_scale, self.steps, self.shift, self.seed = cfg_scale, steps, shift, seed
        self.last_step: int | None = None
        self._warned_no_logger = False

    # -- cadence --------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int):
        """Before the first optimizer step: the untrained model."""
        self.observe(batch)
        if self.at_start and trainer.global_step == 0:
            self._maybe_run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int):  # fmt: skip
        """When the (already advanced) global step is a positive multiple of ``every_n_steps``."""
        self.observe(batch)
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self._maybe_run(trainer, pl_module)

    def _maybe_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last_step == trainer.global_step:
            return
        if self.wanted(trainer, pl_module):
            with full_params(trainer):  # sharded runs: every rank gathers the whole model meanwhile
                self.run(trainer, pl_module)

    # -- for subclasses -------------------------------------------------------------------------
    def observe(self, batch) -> None:
        """Called with every training batch (to keep reference images, say)."""

    def wanted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether to sample now; by default only when there is a TensorBoard logger."""
        if self.tensorboard_loggers(trainer):
            return True
        self.warn_no_logger()
        return False

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    @staticmethod
    def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def warn_no_logger(self) -> None:
        if not self._warned_no_logger:
            rank_zero_warn(f"{type(self).__name__}: no TensorBoardLogger in trainer.loggers; not logging")
            self._warned_no_logger = True


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then restore every submodule's own training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def fork_rng(model: nn.Module) -> Iterator[None]:
    """Leave the global CPU (and the model's CUDA device) RNG state as it was found."""
    device = model.placeholder_ids.device
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


def log_image(writer, tag: str, image: Tensor, step: int, description: str) -> None:
    """Write image (3, H, W) in [0, 1] under ``tag`` with a markdown ``description`` to a ``SummaryWriter``.

    ``SummaryWriter.add_image`` has no description; this sets the summary value's metadata
    (``display_name`` = tag, ``summary_description``), which TensorBoard's image dashboard shows on
    the card. TensorBoard keeps a tag's first metadata only, so the description holds what stays
    fixed over a run (prompts, layout); what changes per step is drawn into the picture.
    """
    from tensorboard.plugins.image import metadata as image_metadata
    from torch.utils.tensorboard.summary import image as image_summary

    summary = image_summary(tag, image.detach().float().cpu().clamp(0, 1), dataformats="CHW")
    meta = image_metadata.create_summary_metadata(display_name=tag, description=description)
    summary.value[0].metadata.CopyFrom(meta)
    writer._get_file_writer().add_summary(summary, step)  # what add_image itself calls


def prompt_list(prompts: list[str]) -> str:
    """Markdown numbered list of the prompts, for an image's description."""
    return "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
