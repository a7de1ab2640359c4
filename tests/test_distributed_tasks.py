"""Ranks whose batches hold different tasks (issue 14, item 11), on CPU with 2 gloo processes.

Rank 0 trains on a generation batch, rank 1 on an understanding or a text-only batch: without
the model's idle pass the CFM head (and on a text batch the vision path) gets no gradient on
rank 1, and DDP (``find_unused_parameters=False``), FSDP and ZeRO-2 wait for it for ever. With
it every strategy makes the step a single process makes on both batches (the mean of their
losses): the idle modules add exactly zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests import ddp_worker
from tests.test_distributed import free_port, initial_state

# A key bias (SigLIP's, the LLM's, the pixel decoder's) shifts every logit of a query equally:
# its exact gradient is 0 and it gets float noise only, which Adam's first step turns into a
# full step of either sign.
NOISE_ONLY = ("k_proj.bias", "to_k.bias")
# Adam's first step is lr * g / (|g| + eps): where |g| is near eps, the rounding of the ranks'
# gradient average moves it by up to ~1% of lr (1e-3); a missing or extra gradient moves it by lr.
ATOL = 3e-5


def one_process_step(state_path, pair: str) -> dict[str, torch.Tensor]:
    """The reference: one process, one AdamW step on the mean of the two ranks' batch losses."""
    module = ddp_worker.tiny_module(str(state_path))
    model = module.model
    batches = ddp_worker.pair_batches(model, pair)

    def forward_loss(step: int) -> torch.Tensor:
        return torch.stack([model(b).loss for b in batches]).mean()

    _, state = ddp_worker.train(model, forward_loss, 1)
    return state


def test_ranks_with_different_tasks_step_as_one_process(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed==0.19.8)")
    state_path = tmp_path / "init.pt"
    start = initial_state(state_path)
    mp.spawn(
        ddp_worker.task_split_worker,
        args=(2, free_port(), str(state_path), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"tasks{r}.pt", weights_only=True) for r in range(2)]
    trainable = {n for n, p in ddp_worker.tiny_module().model.named_parameters() if p.requires_grad}
    for pair in ddp_worker.TASK_PAIRS:
        want = one_process_step(state_path, pair)
        moved = {n for n in trainable if not torch.equal(want[n], start[n])}
        assert any(n.startswith("cfm_head.") for n in moved)  # rank 0's generation loss trains the head
        for name in ("ddp", "fsdp", "zero2"):
            for r in range(2):
                run = ranks[r][f"{name}/{pair}"]
                assert run["global_step"] == 1, (name, pair, r)
                if name == "fsdp" and r == 1:
                    continue  # the gathered state is rank 0's only
                got = run["state"]
                assert got.keys() == want.keys(), (name, pair)
                for key, value in want.items():
                    if key.endswith(NOISE_ONLY):
                        continue
                    torch.testing.assert_close(
                        got[key], value, rtol=1e-5, atol=ATOL, msg=f"{name}/{pair}: {key}"
                    )
