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


def task_batch(model, task: str) -> dict:
    """A one-sample batch of one task: "understanding" (photo + question), "generation" (caption ->
    image) or "text"; each the matching row of :func:`cheers_pl.smoke.mixed_batch`, so that a rank
    holding it leaves the other tasks' modules idle."""
    from cheers_pl.smoke import mixed_batch

    full = mixed_batch(model)
    p = model.processor
    row = {"understanding": 0, "generation": 1, "text": 2}[task]
    image = {"understanding": 0, "generation": 1}.get(task)
    sample = {"input_ids": full["input_ids"][row], "labels": full["labels"][row]}
    sample["input_ids"] = sample["input_ids"][full["attention_mask"][row].bool()]
    sample["labels"] = sample["labels"][full["attention_mask"][row].bool()]
    batch = p.collate([sample])
    if image is not None:
        batch["images"] = full["images"][image : image + 1]
    batch.update(p.batch_index(batch["input_ids"], batch["attention_mask"], batch["labels"]))
    return batch


def generators(rank: int, steps: int) -> list[torch.Generator]:
    """One generator per step for the half of ``rank``: the same draws (t, z0) wherever it runs."""
    return [torch.Generator().manual_seed(1000 * step + rank) for step in range(steps)]


def train(model, forward_loss, steps: int, lr: float = LR) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` AdamW steps (clipping at 1.0, as the experiment YAMLs) with ``forward_loss(step)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
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


def _lightning_env(rank: int, world_size: int, port: int) -> None:
    """The environment of an externally launched cluster: Lightning then uses ``LightningEnvironment``
    (via ``LOCAL_RANK``) instead of re-running the pytest command."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )


class Loader:
    """``batch`` ``n`` times; a DataLoader would add workers and a sampler."""

    def __init__(self, batch: dict, n: int = 2):
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self):
        return self.n


def _module_and_batch(rank: int, seed: int = 0, **kwargs):
    """A tiny ``CheersModule`` (built by the Trainer; ``kwargs`` for it) and rank ``rank``'s half-batch."""
    from cheers_pl.spec import CheersSpec
    from cheers_pl.stages.base import CheersModule

    torch.manual_seed(seed)
    module = CheersModule(CheersSpec.tiny(), lr=1e-3, warmup_ratio=0.0, **kwargs)
    return module, half_batches(module)[rank]  # the module has the processor and image size already


def _trainer(world_size: int, strategy, max_steps: int, out_dir: str, callbacks=()):
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_steps=max_steps,
        precision="32-true",
        gradient_clip_val=1.0,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
    )


def lightning_worker(rank: int, world_size: int, port: int, out_dir: str, strategy: str) -> None:
    """A 2-step Lightning fit of the tiny ``CheersModule`` with ``strategy`` ("fsdp" or "ddp")."""
    from cheers_pl.distributed import CheersFSDPStrategy

    _lightning_env(rank, world_size, port)
    module, batch = _module_and_batch(rank)
    if strategy == "fsdp":
        strat = CheersFSDPStrategy(activation_checkpointing=True, process_group_backend="gloo")
    else:
        strat = "ddp"
    trainer = _trainer(world_size, strat, 2, out_dir)
    trainer.fit(module, train_dataloaders=Loader(batch))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    kinds = [type(m).__name__ for m in trainer.strategy.model.modules()]
    units = {name: kinds.count(name) for name in ("FullyShardedDataParallel", "CheckpointWrapper")}
    result = {"global_step": trainer.global_step, "metrics": metrics, "units": units}
    torch.save(result, f"{out_dir}/lightning{rank}.pt")


# -- sharded checkpoints (tests/test_distributed_checkpoint.py) ---------------------------------------
FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def local_shards(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's shard of every trainable parameter and of its AdamW state, by parameter name.

    With ``use_orig_params`` each parameter is a flat view of this rank's part (possibly empty);
    the optimiser state has the same shape. A restored checkpoint must give back exactly these."""
    model, optimizer = trainer.strategy.model, trainer.optimizers[0]
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for prefix in FSDP_PREFIXES:
            name = name.replace(prefix, "")
        state = optimizer.state.get(p, {})
        out[name] = {"param": p.detach().clone(), **{k: v.detach().clone() for k, v in state.items()}}
    return out


def full_state(trainer) -> dict[str, torch.Tensor]:
    """The gathered (unsharded) module state on rank 0 (empty elsewhere); every rank must call it."""
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

    model = trainer.strategy.model
    with _get_full_state_dict_context(model, world_size=trainer.world_size, rank0_only=True):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sharded_checkpoint_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Fit 2 steps with ``state_dict_type="sharded"`` (ModelCheckpoint saves a folder at step 2), then
    resume a differently seeded module from it for 2 more steps.

    Saved per rank: the local shards after the first fit and at the start of the resumed one
    (after restoring, before any step), the gathered state (rank 0), the resumed module's initial
    trainable weights, and the resumed fit's steps; and an image sampled at step 0 within
    :func:`cheers_pl.distributed.full_params`."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from cheers_pl.distributed import CheersFSDPStrategy, full_params

    _lightning_env(rank, world_size, port)
    ckpt_dir = f"{out_dir}/checkpoints"

    class Preview(Callback):  # samples from the model outside FSDP's forward, as PreviewCallback does
        images = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                with torch.no_grad(), full_params(trainer):
                    self.images = pl_module.model.generate(["a handwritten digit 3"], steps=2, seed=0).images

    def strategy():
        return CheersFSDPStrategy(state_dict_type="sharded", process_group_backend="gloo")

    module, batch = _module_and_batch(rank, seed=0)
    saver, preview = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1), Preview()
    trainer = _trainer(world_size, strategy(), 2, out_dir, [saver, preview])
    trainer.fit(module, train_dataloaders=Loader(batch))
    saved, full = local_shards(trainer), full_state(trainer)
    path = saver.best_model_path or saver.last_model_path

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.start_step = trainer.global_step
            self.restored = local_shards(trainer)
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    probe = Probe()
    module2, batch = _module_and_batch(rank, seed=1)  # other weights: a restore must overwrite them
    module2.configure_model()  # built here to record them (the Trainer's call then keeps it)
    trainable = module2.model.named_parameters(prefix="model")
    fresh = {n: p.detach().clone() for n, p in trainable if p.requires_grad}
    trainer2 = _trainer(world_size, strategy(), 4, out_dir, [probe])
    trainer2.fit(module2, train_dataloaders=Loader(batch), ckpt_path=path)
    result = {
        "path": path,
        "preview": preview.images,
        "saved": saved,
        "full": full,
        "fresh": fresh,
        "restored": probe.restored,
        "start_step": probe.start_step,
        "losses": probe.losses,
        "global_step": trainer2.global_step,
        "final": local_shards(trainer2),
    }
    torch.save(result, f"{out_dir}/sharded{rank}.pt")


# -- DeepSpeed ZeRO (tests/test_distributed_deepspeed.py) ---------------------------------------------
def deepspeed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Fit 2 steps each with DDP, ``CheersDeepSpeedStrategy(stage=2)`` and ``(stage=3)`` (both with
    gradient checkpointing, as ``experiments/strategies/deepspeed_zero*.yaml``) from the same seed and
    half-batch; saves every step's loss and what the DeepSpeed engines were.

    DeepSpeed's shared-memory CPU all-reduce (a C++ op compiled at the first start, needing a
    compiler and tens of seconds) is left out: gloo does the communication."""
    import deepspeed.comm.torch
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from cheers_pl.distributed import CheersDeepSpeedStrategy

    _lightning_env(rank, world_size, port)
    deepspeed.comm.torch.build_shm_op = lambda: None

    class Losses(Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    result = {}
    for name in ("ddp", "zero2", "zero3"):
        L.seed_everything(0, verbose=False)  # the same weights and noise draws in every run
        # the overlays' settings: ZeRO with the model's own gradient checkpointing (exact, so DDP needs none)
        module, batch = _module_and_batch(rank, gradient_checkpointing=name != "ddp")
        if name == "ddp":
            strat = "ddp"
        elif name == "zero2":
            strat = CheersDeepSpeedStrategy(stage=2, process_group_backend="gloo")
        else:  # every tiny parameter is under DeepSpeed's persistence threshold: partition them all
            zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
            strat = CheersDeepSpeedStrategy(config={"zero_optimization": zero}, process_group_backend="gloo")
        probe = Losses()
        trainer = _trainer(world_size, strat, 2, out_dir, [probe])
        trainer.fit(module, train_dataloaders=Loader(batch))
        result[name] = {"losses": probe.losses, "global_step": trainer.global_step}
        if name != "ddp":
            engine = trainer.strategy.model
            params = list(engine.module.parameters())
            result[name].update(
                engine=type(engine).__name__,
                optimizer=type(engine.optimizer).__name__,
                stage=engine.zero_optimization_stage(),
                numel=sum(p.numel() for p in params),  # ZeRO-3: 0 between steps (partitioned)
                full_numel=sum(getattr(p, "ds_numel", p.numel()) for p in params),
                shard_numel=sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0 for p in params),
            )
    torch.save(result, f"{out_dir}/deepspeed{rank}.pt")


# -- ranks with different tasks (tests/test_distributed_tasks.py) -------------------------------------
TASK_PAIRS = {"und": ("generation", "understanding"), "text": ("generation", "text")}


def fixed_noise(model, batch: dict, seed: int) -> dict:
    """``batch`` with its images' z0 and t given (drawn from ``seed``): no draw left to the model,
    so a rank and the single process compute the same losses."""
    images = batch.get("images")
    if images is None:
        return batch
    g = torch.Generator().manual_seed(seed)
    n, c, s = images.shape[0], model.latent_channels, model.latent_side
    gen = set(batch["gen_images"].tolist())
    t = torch.tensor([float(torch.rand((), generator=g)) if i in gen else 1.0 for i in range(n)])
    return {**batch, "z0": torch.randn(n, c, s, s, generator=g), "t": t}


def pair_batches(model, pair: str) -> list[dict]:
    """Rank r's one-task batch of ``TASK_PAIRS[pair]``, with fixed noise."""
    return [
        fixed_noise(model, task_batch(model, task), seed=10 + r) for r, task in enumerate(TASK_PAIRS[pair])
    ]


def task_split_worker(rank: int, world_size: int, port: int, state_path: str, out_dir: str) -> None:
    """One optimiser step with each strategy ("ddp", "fsdp", "zero2"), rank 0 on a generation batch
    and rank 1 on an understanding (pair "und") or a text batch (pair "text"); saves each run's
    weights after the step. The process-group timeout is short: a rank left waiting fails fast."""
    import deepspeed.comm.torch
    from lightning.pytorch.strategies import DDPStrategy

    from cheers_pl.distributed import CheersDeepSpeedStrategy, CheersFSDPStrategy

    _lightning_env(rank, world_size, port)
    deepspeed.comm.torch.build_shm_op = lambda: None
    result = {}
    for name in ("ddp", "fsdp", "zero2"):
        for pair in TASK_PAIRS:
            module, _ = _module_and_batch(rank, collective_timeout_s=20.0)
            module.configure_model()
            module.model.load_state_dict(torch.load(state_path, weights_only=True))
            batch = pair_batches(module.model, pair)[rank]
            if name == "ddp":
                strat = DDPStrategy(find_unused_parameters=False, process_group_backend="gloo")
            elif name == "fsdp":
                strat = CheersFSDPStrategy(process_group_backend="gloo")
            else:
                strat = CheersDeepSpeedStrategy(stage=2, process_group_backend="gloo")
            trainer = _trainer(world_size, strat, 1, out_dir)
            trainer.fit(module, train_dataloaders=Loader(batch, n=1))
            if name == "fsdp":
                state = full_state(trainer)
                state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            else:
                state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
            result[f"{name}/{pair}"] = {"state": state, "global_step": trainer.global_step}
    torch.save(result, f"{out_dir}/tasks{rank}.pt")


# -- hung collectives and SIGTERM (tests/test_distributed_signals.py) ---------------------------------
def skipped_collective_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """A 1-step DDP fit (collective timeout 3 s) after which rank 0 makes one all-reduce that rank 1
    skips: rank 1 stays alive 8 s more (busy elsewhere), so rank 0's collective can only end by the
    timeout. Rank 0 saves what it raised and how long the collective took."""
    import time

    from lightning.pytorch.callbacks import Callback

    _lightning_env(rank, world_size, port)

    class ExtraCollective(Callback):
        def on_train_end(self, trainer, pl_module):
            if trainer.global_rank == 0:
                self.start = time.monotonic()
                torch.distributed.all_reduce(torch.ones(1))

    module, batch = _module_and_batch(rank, collective_timeout_s=3.0)
    extra = ExtraCollective()
    trainer = _trainer(world_size, "ddp", 1, out_dir, [extra])
    try:
        trainer.fit(module, train_dataloaders=Loader(batch, n=1))
    except Exception as err:
        result = {"error": str(err), "notes": getattr(err, "__notes__", [])}
        result["seconds"] = time.monotonic() - extra.start
        torch.save(result, f"{out_dir}/skipped{rank}.pt")
        return
    if rank == 1:
        time.sleep(8)


def sigterm_in_collective_worker(rank: int, port: int, grace_s: float) -> None:
    """Rank 0 blocks in an all-reduce rank 1 never joins (no timeout that soon) and is sent SIGTERM
    1 s later, with a Python SIGTERM handler installed as Lightning's: only the watchdog of
    :class:`cheers_pl.distributed.RunGuard` can end it (exit code 143)."""
    import signal
    import threading
    import time
    from types import SimpleNamespace

    from cheers_pl.distributed import RunGuard

    _init_group(rank, 2, port)
    if rank == 1:
        time.sleep(60)
        return
    signal.signal(signal.SIGTERM, lambda *_: None)  # the handler a hung main thread never runs
    guard = RunGuard(collective_timeout_s=600.0, sigterm_grace_s=grace_s)
    guard.setup(SimpleNamespace(received_sigterm=False, strategy=None), None, "fit")
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    torch.distributed.all_reduce(torch.ones(1))
