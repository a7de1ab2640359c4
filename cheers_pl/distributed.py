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
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.strategies import FSDPStrategy
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
