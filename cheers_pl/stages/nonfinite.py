"""Non-finite steps: which batches fed the step, how many steps were skipped, and the message.

``CheersModule.on_before_optimizer_step`` asks :meth:`NonFiniteLedger.finite` whether the
losses and gradients of the step are finite; if not it drops the gradients (nothing moves) and
records the skip here, with the sample ids of every batch of the step. The ledger is saved in
checkpoints, so a resumed run keeps counting.
"""

from __future__ import annotations

import torch


class NonFiniteLedger:
    """Which batches since the last optimiser step were seen, and the skipped steps so far.

    ``observe`` records each batch's loss and sample ids (several with gradient accumulation);
    ``finite`` reduces the losses and gradients to one flag (a single host read); ``skipped``
    counts a step and returns the warning naming its sample ids.
    """

    def __init__(self) -> None:
        self.total, self.in_a_row = 0, 0
        self.recent: list[dict] = []  # the skipped steps of the current run of skips
        self._losses: list[torch.Tensor] = []
        self._ids: list[str] = []

    def observe(self, loss: torch.Tensor, ids: list[str] | None, batch_idx: int) -> None:
        self._losses.append(loss)
        self._ids.extend(ids if ids is not None else [f"batch {batch_idx}"])

    def finite(self, grads: list[torch.Tensor]) -> bool:
        norms = [torch.stack(self._losses).float()] if self._losses else []
        if grads:
            norms.append(torch.stack(torch._foreach_norm(grads)).float())
        return bool(torch.cat(norms).isfinite().all()) if norms else True

    def passed(self) -> None:
        self.in_a_row, self.recent = 0, []
        self._losses, self._ids = [], []

    def skipped(self, step: int) -> str:
        self.total += 1
        self.in_a_row += 1
        self.recent.append({"step": step, "ids": list(self._ids)})
        self._losses, self._ids = [], []
        names = self._names(self.recent[-1])
        return f"step {step}: non-finite loss or gradient, step skipped (skip {self.total}); samples: {names}"

    def report(self) -> str:
        return "Skipped steps and their samples: " + "; ".join(
            f"step {r['step']}: {self._names(r)}" for r in self.recent
        )

    @staticmethod
    def _names(record: dict) -> str:
        return ", ".join(record["ids"]) or "(no ids)"

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row, "recent": self.recent}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row, self.recent = state["total"], state["in_a_row"], list(state["recent"])
