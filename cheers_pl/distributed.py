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
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Generator
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
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
