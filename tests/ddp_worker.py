"""Worker processes for ``tests/test_distributed.py`` (started with ``torch.multiprocessing.spawn``).

Everything here runs on CPU with the gloo backend over loopback (127.0.0.1), one thread each.
"""

from __future__ import annotations

import os

import torch

STEPS = 3
LR = 1e-3


def tiny_module(state_path: str | None = None, **kwargs):
    """A tiny ``CheersModule`` with its model built (weights from ``state_path`` when given)."""
    from cheers_pl.spec import CheersSpec
    from cheers_pl.stages.base import CheersModule

    module = CheersModule(CheersSpec.tiny(), **kwargs)
    module.configure_model()
    if state_path is not None:
        module.model.load_state_dict(torch.load(state_path, weights_only=True))
    return module


def half_batches(model) -> list[dict]:
    """Two halves of a global batch of 6: each the understanding / generation / text-only triple
    of :func:`cheers_pl.smoke.mixed_batch`; the second half's images are mirrored, so both
    halves use every module and differ in content."""
    from cheers_pl.smoke import mixed_batch

    first = mixed_batch(model)
    second = {**first, "images": first["images"].flip(-1)}
    return [first, second]


def generators(rank: int, steps: int) -> list[torch.Generator]:
    """One generator per step for the half of ``rank``: the same draws (t, z0) wherever it runs."""
    return [torch.Generator().manual_seed(1000 * step + rank) for step in range(steps)]


def train(model, forward_loss, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` AdamW steps (clipping at 1.0, as the experiment YAMLs) with ``forward_loss(step)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss = forward_loss(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _init_group(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def ddp_worker(rank: int, world_size: int, port: int, state_path: str, out_dir: str) -> None:
    """Plain ``DistributedDataParallel``: rank r trains on half r with generator (step, r)."""
    from torch.nn.parallel import DistributedDataParallel

    _init_group(rank, world_size, port)
    try:
        model = tiny_module(state_path).model
        batch = half_batches(model)[rank]
        gens = generators(rank, STEPS)
        ddp = DistributedDataParallel(model)  # every trainable parameter is used: no unused search

        def forward_loss(step: int) -> torch.Tensor:
            return ddp(batch, generator=gens[step]).loss

        losses, state = train(ddp, forward_loss, STEPS)
        # the global loss of each step, as the single process computes it (the mean of the halves)
        global_losses = torch.tensor(losses)
        torch.distributed.all_reduce(global_losses)
        global_losses /= world_size
        state = {k.removeprefix("module."): v for k, v in state.items()}
        torch.save(
            {"losses": losses, "global_losses": global_losses, "state": state}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        torch.distributed.destroy_process_group()


def lightning_worker(rank: int, world_size: int, port: int, out_dir: str, strategy: str) -> None:
    """A 2-step Lightning fit of the tiny ``CheersModule`` with ``strategy`` ("fsdp" or "ddp").

    The processes are launched here, so Lightning sees an externally launched cluster
    (``LightningEnvironment`` via ``LOCAL_RANK``) instead of re-running the pytest command."""
    import lightning as L

    from cheers_pl.distributed import CheersFSDPStrategy

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    from cheers_pl.spec import CheersSpec
    from cheers_pl.stages.base import CheersModule

    torch.manual_seed(0)
    module = CheersModule(CheersSpec.tiny(), lr=1e-3, warmup_ratio=0.0)  # built by the Trainer
    batch = half_batches(module)[rank]  # the module has the processor and image size already

    class Loader:  # the same half-batch twice; a DataLoader would add workers and a sampler
        def __iter__(self):
            return iter([batch, batch])

        def __len__(self):
            return 2

    if strategy == "fsdp":
        strat = CheersFSDPStrategy(activation_checkpointing=True, process_group_backend="gloo")
    else:
        strat = "ddp"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strat,
        max_steps=2,
        precision="32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
    )
    trainer.fit(module, train_dataloaders=Loader())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    kinds = [type(m).__name__ for m in trainer.strategy.model.modules()]
    units = {name: kinds.count(name) for name in ("FullyShardedDataParallel", "CheckpointWrapper")}
    result = {"global_step": trainer.global_step, "metrics": metrics, "units": units}
    torch.save(result, f"{out_dir}/lightning{rank}.pt")
