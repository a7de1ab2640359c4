"""Non-finite steps: skipped (nothing moves), counted, reported with sample ids; K in a row stop.

Real Lightning fits of the tiny stage II over hand-made mixed batches; a batch whose images are
NaN gives a NaN loss (and gradients); a gradient hook makes a finite loss give inf gradients.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec
from cheers_pl.stages import PretrainStage

TASKS = ["understanding", "generation", "text"]


class Snapshots(L.Callback):
    """Every parameter after every optimiser step, and the warnings' text."""

    def __init__(self, poison_grad_at: int | None = None):
        self.states: list[dict[str, torch.Tensor]] = []
        self.poison_grad_at, self.hook = poison_grad_at, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.poison_grad_at:
            p = module.model.cfm_head.stage_b_final.linear.weight
            self.hook = p.register_hook(lambda g: g * float("inf"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.states.append({n: p.detach().clone() for n, p in module.model.named_parameters()})


def batches(module, poisoned: set[int], n: int) -> list[dict]:
    out = []
    for i in range(n):
        b = mixed_batch(module.model)
        b["ids"] = [f"b{i}-{t}" for t in TASKS]
        b["tasks"] = list(TASKS)
        if i in poisoned:
            b["images"] = torch.full_like(b["images"], float("nan"))
        out.append(b)
    return out


def fit(poisoned: set[int], n: int, poison_grad_at: int | None = None, **kw):
    torch.manual_seed(0)
    module = PretrainStage(spec=CheersSpec.tiny(), warmup_ratio=0.0, **kw)
    module.configure_model()
    snaps = Snapshots(poison_grad_at)
    trainer = L.Trainer(
        max_steps=n, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[snaps], gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches(module, poisoned, n), batch_size=None, collate_fn=lambda b: b))
    return module, snaps, trainer


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_batch_is_skipped_counted_and_named():
    with pytest.warns(UserWarning, match=r"non-finite loss or gradient.*b1-understanding, b1-generation"):
        module, snaps, trainer = fit({1}, 3)
    s = snaps.states
    assert same(s[1], s[0])  # the NaN step changed nothing
    assert not same(s[2], s[1])  # the next good step trains again
    assert all(torch.isfinite(t).all() for t in s[2].values())
    assert module.nonfinite.total == 1 and module.nonfinite.in_a_row == 0
    assert trainer.callback_metrics["train/nonfinite_skips"] == 1.0
    state = trainer.optimizers[0].state_dict()["state"]
    assert all(int(v["step"]) == 2 for v in state.values())  # AdamW stepped twice, not three times


def test_an_infinite_gradient_with_a_finite_loss_is_skipped():
    with pytest.warns(UserWarning, match="step skipped"):
        module, snaps, _ = fit(set(), 3, poison_grad_at=1)
    assert same(snaps.states[1], snaps.states[0]) and not same(snaps.states[2], snaps.states[1])
    assert module.nonfinite.total == 1


def test_k_bad_steps_in_a_row_stop_the_run_naming_their_samples():
    with pytest.warns(UserWarning), pytest.raises(RuntimeError) as err:
        fit({1, 2, 3}, 5, max_nonfinite_steps=3)
    text = str(err.value)
    assert "3 optimiser steps in a row" in text and "max_nonfinite_steps=3" in text
    assert all(f"b{i}-text" in text for i in (1, 2, 3)) and "b0-" not in text


def test_skipping_can_be_turned_off():
    module, snaps, _ = fit({1}, 2, skip_nonfinite=False)
    assert module.nonfinite.total == 0
    assert not all(torch.isfinite(t).all() for t in snaps.states[1].values())  # the NaN went in


def test_the_count_is_saved_in_checkpoints():
    module = PretrainStage(spec=CheersSpec.tiny())
    module.nonfinite.observe(torch.tensor(float("nan")), ["x"], 0)
    module.nonfinite.skipped(7)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    fresh = PretrainStage(spec=CheersSpec.tiny())
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.nonfinite.state_dict() == {"total": 1, "in_a_row": 1, "recent": [{"step": 7, "ids": ["x"]}]}
    assert set(checkpoint["rng_states"]) == {"world_size", "ranks"}
