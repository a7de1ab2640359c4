"""Stage II, general pre-training (DESIGN section 5)."""

from __future__ import annotations

from cheers_pl.spec import CheersSpec
from cheers_pl.stages.base import CheersModule


class PretrainStage(CheersModule):
    """Stage II, general pre-training (DESIGN section 5).

    Trains all but the VAE on understanding : generation : text = 3 : 6 : 1 per sample.
    LR 1e-4, constant.
    """

    trains = "all"

    def __init__(
        self, spec: CheersSpec | None = None, lr: float = 1e-4, schedule: str = "constant", **kwargs
    ):
        super().__init__(spec=spec, lr=lr, schedule=schedule, **kwargs)
