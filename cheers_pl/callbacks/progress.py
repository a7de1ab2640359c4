"""``CheersProgressBar`` and ``ThroughputLog``: a readable progress bar and torchtitan-style speed lines.

``CheersProgressBar`` is Lightning's :class:`RichProgressBar` without the logger's ``v_num`` in
the postfix and with an epoch display that makes sense for step-bounded runs: ``max_epochs: -1``
(every stage YAML: runs end at ``max_steps``) shows ``Epoch 0`` instead of Lightning's
``Epoch 0/-2``.

``ThroughputLog`` prints, every ``every_n_steps`` optimizer steps on global rank 0, one line ::

    step 200 | loss 3.412 | 41.3 samples/s | 5.2k tokens/s | peak mem 1.84 GiB

and logs the same figures to the trainer's loggers as ``perf/samples_per_s``,
``perf/tokens_per_s`` (non-padding tokens: ``attention_mask.sum()``) and ``perf/peak_mem_gib``.
Rates are over the steps since the previous line, summed over ranks (each rank counts its own
batches; the world size multiplies them, since every rank sees a batch of the same shape
contract). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak
resident set size (``ru_maxrss``, which includes the Python runtime and the libraries).
"""

from __future__ import annotations

import resource
import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info


class CheersProgressBar(RichProgressBar):
    """:class:`RichProgressBar` without ``v_num`` and without ``/-2`` for ``max_epochs: -1`` runs."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch}"
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            text += f"/{max_epochs - 1}"
        if len(self.validation_description) > len(text):  # Lightning's padding against flicker
            text = f"{text:{len(self.validation_description)}}"
        return text


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA's max allocated on a CUDA device, else the process's peak RSS (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _si(x: float) -> str:
    """``5234.1 -> '5.2k'``, ``1.2e6 -> '1.2M'``, ``41.3 -> '41.3'``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.1f}"


class ThroughputLog(pl.Callback):
    """Every ``every_n_steps`` optimizer steps: samples/s, tokens/s and peak memory, printed and logged.

    Args:
        every_n_steps: optimizer steps between two lines (and between two logged points); None:
            ten times the trainer's ``log_every_n_steps``.
        print_line: print the line (rank 0); ``False`` only logs the ``perf/*`` scalars.
    """

    def __init__(self, every_n_steps: int | None = None, print_line: bool = True) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"ThroughputLog: every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.print_line = print_line
        self._reset(time.perf_counter())
        self.last: dict[str, float] = {}
        self._logged_step = -1

    def _reset(self, now: float) -> None:
        self._start, self._samples, self._tokens = now, 0, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None:
            self.every_n_steps = 10 * max(1, trainer.log_every_n_steps)
        self._reset(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if isinstance(batch, dict) and "attention_mask" in batch:
            mask = batch["attention_mask"]
            self._samples += int(mask.shape[0])
            self._tokens = self._tokens + mask.sum()  # on the device: read only when a line is due
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._logged_step:
            return  # (under gradient accumulation several batches end at the same global step)
        self._logged_step = step
        now = time.perf_counter()
        secs = max(now - self._start, 1e-9)
        world = trainer.world_size
        self.last = {
            "perf/samples_per_s": self._samples * world / secs,
            "perf/tokens_per_s": float(self._tokens) * world / secs,
            "perf/peak_mem_gib": peak_memory_gib(pl_module.device),
        }
        self._reset(now)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step)
        if self.print_line:
            loss = trainer.callback_metrics.get("train/loss")
            parts = [f"step {step}"]
            if loss is not None:
                parts.append(f"loss {float(loss):.3f}")
            parts += [
                f"{self.last['perf/samples_per_s']:.1f} samples/s",
                f"{_si(self.last['perf/tokens_per_s'])} tokens/s",
                f"peak mem {self.last['perf/peak_mem_gib']:.2f} GiB",
            ]
            rank_zero_info(" | ".join(parts))
