"""Sharded data parallel for CHEERS: FSDP with the decoder layers and DiT blocks as wrap units.

``CheersFSDPStrategy`` is Lightning's ``FSDPStrategy`` with CHEERS's defaults, usable from YAML
(class objects cannot be written there): the wrap units are the Qwen2 decoder layers, the SigLIP
encoder layers and the DiT blocks of the CFM head; ``activation_checkpointing: true``
checkpoints the same units (gradient checkpointing). Launch multi-node runs as Lightning does
(SLURM ``srun``, or ``torchrun`` with ``--nnodes``/``--nproc-per-node``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
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
