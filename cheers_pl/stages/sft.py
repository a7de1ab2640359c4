"""Stage IV, supervised fine-tuning (DESIGN section 5)."""

from __future__ import annotations

from cheers_pl.spec import CheersSpec
from cheers_pl.stages.base import CheersModule


class SFTStage(CheersModule):
    """Stage IV, supervised fine-tuning (DESIGN section 5).

    Trains all but the VAE; understanding and generation batches 1 : 1. LR 2e-5, cosine.
    """

    trains = "all"

    def __init__(self, spec: CheersSpec | None = None, lr: float = 2e-5, schedule: str = "cosine", **kwargs):
        super().__init__(spec=spec, lr=lr, schedule=schedule, **kwargs)
