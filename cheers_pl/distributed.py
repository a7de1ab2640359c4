"""Sharded data parallel for CHEERS: FSDP with the decoder layers and DiT blocks as wrap units.

``CheersFSDPStrategy`` is Lightning's ``FSDPStrategy`` with CHEERS's defaults, usable from YAML
(class objects cannot be written there): the wrap units are the Qwen2 decoder layers, the SigLIP
encoder layers and the DiT blocks of the CFM head; ``activation_checkpointing: true``
checkpoints the same units (gradient checkpointing). Launch multi-node runs as Lightning does
(SLURM ``srun``, or ``torchrun`` with ``--nnodes``/``--nproc-per-node``).

On CPU (``accelerator: cpu``, gloo; tests and tiny runs) the model is wrapped with
``device_id=cpu``: Lightning passes the device index (None on CPU), and FSDP then looks for an
accelerator and refuses to start on a machine without one.

Gradient clipping by norm (``gradient_clip_val: 1.0`` in the stage YAMLs): Lightning's
``FSDPPrecision`` refuses it (it has no handle on the root FSDP module); this strategy gives it
one, so the norm is FSDP's ``clip_grad_norm_`` over all shards (the global norm).

``state_dict_type: sharded`` saves each checkpoint as a folder (one ``torch.distributed.checkpoint``
shard per rank plus ``meta.pt``); ``ckpt_path=`` resumes from it on the same or another world
size, and :func:`cheers_pl.io.sharded.consolidate` turns it into one ``.ckpt`` file.

``CheersDeepSpeedStrategy`` is the DeepSpeed ZeRO alternative (stage 2 or 3); see its docstring.

Runs that cannot hang for ever (any strategy, ``ddp`` included): :class:`RunGuard`, a callback
every ``CheersModule`` adds (``configure_callbacks``), sets the process group's timeout
(``model.init_args.collective_timeout_s``, 30 min by default), names the likely cause when a
collective fails or times out, saves a last checkpoint on SIGTERM (Lightning's signal handling;
exit code 143), and ends a process whose main thread is stuck in a collective when SIGTERM
arrives (``sigterm_grace_s`` later: a hung collective never returns to Python, where Lightning's
handler runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Generator
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from cheers_pl.components.dit import DiTBlock

WRAP_UNITS = {Qwen2DecoderLayer, SiglipEncoderLayer, DiTBlock}


class CheersFSDPStrategy(FSDPStrategy):
    """FSDP wrapping (and optionally checkpointing) CHEERS's transformer blocks.

    Args:
        activation_checkpointing: recompute each wrap unit's activations in the backward pass.
        sharding_strategy: FSDP's (``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD``, ...).
        state_dict_type: ``"full"`` (one file) or ``"sharded"`` (a folder per checkpoint).
        **kwargs: anything else ``FSDPStrategy`` takes.
    """

    strategy_name = "cheers_fsdp"

    def __init__(
        self,
        activation_checkpointing: bool = False,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        **kwargs: Any,
    ):
        super().__init__(
            auto_wrap_policy=WRAP_UNITS,
            activation_checkpointing_policy=WRAP_UNITS if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            use_orig_params=True,  # frozen and trainable parameters share wrap units (stage I)
            **kwargs,
        )

    def setup(self, trainer) -> None:
        super().setup(trainer)
        root = self.model  # the root FSDP module (LightningModule inside)
        self.precision_plugin.clip_grad_by_norm = lambda optimizer, clip_val: root.clip_grad_norm_(clip_val)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if self.root_device.type != "cpu" or wrapped:
            return super()._setup_model(model)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


class CheersDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (ZeRO stage 2 or 3) with three changes for CHEERS.

    * ``zero_init: false`` (the default) builds the model whole on each rank and lets
      ``deepspeed.initialize`` partition it (ZeRO-3), instead of building it inside
      ``deepspeed.zero.Init``: there the parameters are partitioned as they are created, and
      transformers' weight initialisation of SigLIP (``lecun_normal_``) then fails on the empty
      placeholders ("Fan in and fan out can not be computed for tensor with fewer than 2
      dimensions"). The cost is one full fp32 copy of the model per rank while it is built.
    * ``accelerator: cpu`` works (gloo; tests and tiny runs): Lightning refuses a CPU
      accelerator ("The DeepSpeed strategy is only supported on CUDA GPUs"), checks CUDA device
      indices, and hands DeepSpeed the device index ``None``; on CPU this strategy skips the first
      two and gives DeepSpeed the local rank (on CUDA, Lightning's code runs unchanged).
    * DeepSpeed's micro-batch size (for its logs) is the DataModule's ``batch_size``: Lightning's
      guess reads a batch sampler the kit's loaders do not have, and fails.

    Gradient clipping (``trainer.gradient_clip_val``) is DeepSpeed's own, by the global norm.
    Checkpoints are folders in DeepSpeed's format; Lightning's
    ``lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict`` makes one
    file of them.

    Args:
        stage: the ZeRO stage (2: optimiser states and gradients sharded; 3: parameters too).
        zero_init: build the model inside ``deepspeed.zero.Init`` (ZeRO-3 only; see above).
        **kwargs: anything else ``DeepSpeedStrategy`` takes (``offload_optimizer``, ``config``, ...).
    """

    strategy_name = "cheers_deepspeed"

    def __init__(self, stage: int = 2, zero_init: bool = False, **kwargs: Any):
        super().__init__(stage=stage, **kwargs)
        self.zero_init = zero_init

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu():
            DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's refuses anything but CUDA
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        reset_seed()  # as DeepSpeedStrategy's, without its check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @contextlib.contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        if self.zero_init:
            with super().model_sharded_context():
                yield
        else:
            yield

    def _auto_select_batch_size(self) -> int:
        """DeepSpeed's ``train_micro_batch_size_per_gpu`` (used for its throughput logs only).

        Lightning reads ``train_dataloader.batch_sampler.batch_size``; the kit's loaders batch in
        the dataset (``batch_size=None``, no batch sampler), so that fails with an AttributeError.
        Here: the DataModule's ``batch_size`` (per device), else Lightning's guess, else 1."""
        size = getattr(getattr(self.lightning_module.trainer, "datamodule", None), "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
        try:
            return super()._auto_select_batch_size()
        except AttributeError:  # a loader without a batch sampler
            return 1

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # Lightning's: the index, None on CPU
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


@contextlib.contextmanager
def full_params(trainer) -> Generator[None, None, None]:
    """Within it, ``pl_module.model``'s submodules may be called directly (``model.generate``) on
    every rank of a sharded run; everyone must enter it together.

    FSDP gathers a unit's parameters only inside the root module's forward: outside it (in a
    callback sampling previews, say) each parameter is this rank's flat shard, and the first layer
    fails ("'weight' must be 2-D"). Under ``FSDPStrategy`` this is FSDP's ``summon_full_params``
    (read-only: ``writeback=False``; the whole model is materialised on each rank meanwhile).
    DeepSpeed ZeRO-3 gathers per submodule by its own hooks, and unsharded strategies need nothing:
    there it does nothing.
    """
    model = getattr(trainer.strategy, "model", None)
    if isinstance(trainer.strategy, FSDPStrategy) and model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield
    else:
        yield


# -- runs that cannot hang for ever ----------------------------------------------------------------
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM
_BACKENDS = ("gloo", "nccl", "c10d", "processgroup")
_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def explain_collective_error(err: BaseException, timeout_s: float | None = None) -> str | None:
    """One line naming the likely cause when ``err`` (or what caused it) is a failed or timed-out
    collective (a ``torch.distributed.DistError``, or a backend's timeout / lost-peer message),
    else None."""
    chain, seen = [], err
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e).lower() for e in chain)
    dist_error = any(isinstance(e, getattr(torch.distributed, "DistError", ())) for e in chain)
    backend = any(k in text for k in _BACKENDS) and any(k in text for k in _FAILURES)
    if not (dist_error or backend):
        return None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else "?"
    what = "timed out" if "time" in text else "failed (a peer left)"
    limit = f" after collective_timeout_s={timeout_s:g}" if timeout_s is not None and "time" in text else ""
    return (
        f"cheers: rank {rank}: a collective {what}{limit}: the ranks did not run the same collectives. "
        "Likely cause: a rank that got a different task and left a module without a gradient "
        "(CheersModel.idle_pass='never'?), a rank that skipped or added a collective or a step "
        "(a shorter data stream, a rank-only branch), or a rank that died or stalled: read the other "
        "ranks' last lines. Raise model.init_args.collective_timeout_s only for slow ranks."
    )


class RunGuard(Callback):
    """Collective timeout, a clear line for a hung collective, SIGTERM handling (module docstring).

    Args:
        collective_timeout_s: the default process group's timeout, set at ``setup`` (a hung
            collective then raises on its rank after this many seconds instead of waiting for ever).
        sigterm_grace_s: after SIGTERM, how long Lightning's handler may take to start; a process
            whose main thread has not run it by then is stuck in C (a collective) and exits
            with code 143 (rank 0 kills the ranks it launched first). 0: never.
    """

    def __init__(self, collective_timeout_s: float = 1800.0, sigterm_grace_s: float = 60.0):
        if not collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s={collective_timeout_s} must be > 0 (seconds)")
        if sigterm_grace_s < 0:
            raise ValueError(f"sigterm_grace_s={sigterm_grace_s} must be >= 0 (seconds; 0: never)")
        self.collective_timeout_s, self.sigterm_grace_s = collective_timeout_s, sigterm_grace_s
        self._watchdog: _SigtermWatchdog | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.set_timeout(timedelta(seconds=self.collective_timeout_s))
        if self.sigterm_grace_s and self._watchdog is None and _in_main_thread():
            self._watchdog = _SigtermWatchdog(trainer, self.sigterm_grace_s)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:  # read when Lightning registers its handlers, after this hook
            connector._sigterm_notifier_fn = types.MethodType(_sigterm_flag_only, connector)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            save_last_on_sigterm(trainer)
            exception.code = SIGTERM_EXIT_CODE  # not 0: the run did not finish
            return
        line = explain_collective_error(exception, self.collective_timeout_s)
        if line is not None:
            exception.add_note(line)  # printed after the error's own message
            print(line, file=sys.stderr, flush=True)


def _sigterm_flag_only(connector, signum, frame) -> None:
    """Lightning's SIGTERM handler without its ``dist.broadcast``: a collective run from a signal
    handler meets whatever collective another rank is in (a DDP bucket all-reduce, say), and gloo
    aborts the process ("Received data size doesn't match expected size"). The training loop
    broadcasts rank 0's flag before every batch, at the same point on every rank; that suffices."""
    rank_zero_info(f"Received SIGTERM: {signum}; stopping after this batch (a last checkpoint is saved)")
    if not connector.received_sigterm:
        launcher = connector.trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signum)  # the ranks this process started
    connector.received_sigterm = True


def save_last_on_sigterm(trainer) -> None:
    """Save each ``ModelCheckpoint``'s last checkpoint (``save_last``) unless this step's is saved."""
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or not cb.save_last:
            continue
        if cb._last_global_step_saved == trainer.global_step or trainer.global_step == 0:
            continue
        cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
        rank_zero_info(f"SIGTERM: saved {cb.last_model_path} at step {trainer.global_step}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _SigtermWatchdog:
    """A thread that sees SIGTERM even while the main thread is blocked in C (``signal.set_wakeup_fd``:
    the interpreter's C-level handler writes the signal number to a socket at once; Python handlers
    wait for the main thread to return to Python, which a hung collective never does)."""

    def __init__(self, trainer, grace_s: float):
        self.trainer, self.grace_s = trainer, grace_s
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="cheers-sigterm-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if _in_main_thread():
            signal.set_wakeup_fd(self._previous)
        self._write.close()  # ends the thread's recv
        self._read.close()

    def _watch(self) -> None:
        while True:
            try:
                data = self._read.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                self._after_sigterm()

    def _after_sigterm(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if getattr(self.trainer, "received_sigterm", False):  # set by _sigterm_flag_only
                return  # Lightning's handler ran: the run stops at the next batch, with a checkpoint
            time.sleep(0.1)
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        print(
            f"cheers: rank {rank}: SIGTERM {self.grace_s:g} s ago and the main thread has not run "
            "Python since: it is stuck in C, most likely a collective another rank never joined "
            "(ranks with different tasks or steps); exiting with 143 without a checkpoint",
            file=sys.stderr,
            flush=True,
        )
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        for proc in getattr(launcher, "procs", []):  # the ranks this process started
            with contextlib.suppress(Exception):
                proc.kill()
        os._exit(SIGTERM_EXIT_CODE)
