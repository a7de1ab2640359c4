"""``DataStatsCallback``: the data-fault counters of a run, where a user looks.

:meth:`CheersDataModule.data_stats() <cheers_pl.data.datamodule.CheersDataModule.data_stats>`
counts what was skipped, repaired or dropped (bad samples by task and reason, shard faults,
dropped tasks), summed over workers and ranks. Without this callback those counts live only
inside the checkpoint. Every ``every_n_steps`` steps (default: the trainer's
``log_every_n_steps``) they go

* to every logger as ``data/<counter>`` scalars (TensorBoard: ``data/skipped/understanding/too_long``);
* to the progress bar's postfix, summed by kind (``data/skipped=45, data/truncated_shard=14``),
  once one is nonzero;

and at the end of fit (or when it stops on an error, in a one-process run) a summary is printed.

YAML::

    trainer:
      callbacks:
        - class_path: cheers_pl.callbacks.DataStatsCallback
"""

from __future__ import annotations

from collections import Counter

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only


def _stats(trainer: L.Trainer) -> dict[str, int] | None:
    """The datamodule's counters, or None when the run has no CHEERS datamodule."""
    dm = getattr(trainer, "datamodule", None)
    return dm.data_stats() if dm is not None and hasattr(dm, "data_stats") else None


def by_kind(stats: dict[str, int]) -> dict[str, int]:
    """Counters summed by their first part: ``{"skipped/a/x": 2, "skipped/b/y": 1}`` -> ``{"skipped": 3}``."""
    out: Counter[str] = Counter()
    for key, n in stats.items():
        out[key.split("/", 1)[0]] += n
    return dict(out)


def summary(stats: dict[str, int]) -> str:
    """The end-of-fit report: one line per counter, or one line saying the data was clean."""
    if not stats:
        return "data: no sample skipped or repaired, no shard fault (CheersDataModule.data_stats is empty)"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(by_kind(stats).items()))
    width = max(len(k) for k in stats)
    lines = [f"data: skipped, repaired or dropped in this run ({kinds}); the log above names the first few:"]
    lines += [f"  {key:<{width}}  {n}" for key, n in sorted(stats.items())]
    return "\n".join(lines)


class DataStatsCallback(L.Callback):
    """Logs, shows and summarises ``CheersDataModule.data_stats()`` (see the module docstring).

    Args:
        every_n_steps: how often the counters are read (with several ranks, reading them gathers
            every rank's data state); None: the trainer's ``log_every_n_steps``.
    """

    def __init__(self, every_n_steps: int | None = None):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps={every_n_steps!r} must be >= 1 or null (log_every_n_steps)")
        self.every_n_steps = every_n_steps
        self.last: dict[str, int] = {}
        self._published_at = -1  # the optimizer step last published (accumulation repeats steps)

    def _refresh(self, trainer: L.Trainer) -> dict[str, int] | None:
        """Read the counters into ``last`` and write the nonzero ones to the loggers; None: no data module."""
        stats = _stats(trainer)
        if stats is None:
            return None
        self.last = stats
        if stats:
            self._to_loggers(trainer, stats)
        return stats

    def _publish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = self._refresh(trainer)
        if stats is None:
            return
        for kind, n in by_kind(stats).items():
            pl_module.log(f"data/{kind}", float(n), prog_bar=True, logger=False, on_step=True, on_epoch=False)

    @rank_zero_only
    def _to_loggers(self, trainer: L.Trainer, stats: dict[str, int]) -> None:
        metrics = {f"data/{key}": float(n) for key, n in stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or max(1, trainer.log_every_n_steps)
        if trainer.global_step % every == 0 and trainer.global_step != self._published_at:
            self._published_at = trainer.global_step
            self._publish(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        stats = self._refresh(trainer)
        if stats is not None and trainer.is_global_zero:
            print(summary(stats), flush=True)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if dist.is_available() and dist.is_initialized():
            return  # reading the counters would gather from ranks that may be gone
        try:
            stats = _stats(trainer)
        except Exception:  # noqa: BLE001 - the run's own error is the one to see
            return
        if stats:
            print(summary(stats), flush=True)
