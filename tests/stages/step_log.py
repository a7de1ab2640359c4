"""A test callback: one JSON line per optimiser step (step, loss, sample ids), fsynced at once.

Used by the kill-and-resume test, whose parent process reads the lines of a run it kills.
"""

from __future__ import annotations

import json
import os

import lightning as L


class StepLog(L.Callback):
    """Appends {"step", "loss", "ids"} to ``path`` after every training batch."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"step": trainer.global_step, "loss": float(loss), "ids": list(batch["ids"])}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
