"""Stage III, refined pre-training (DESIGN section 5)."""

from __future__ import annotations

from cheers_pl.spec import CheersSpec
from cheers_pl.stages.base import CheersModule


class RefinedStage(CheersModule):
    """Stage III, refined pre-training (DESIGN section 5).

    Trains all but the VAE on 3 : 6 : 1 per sample (synthetic generation data). LR 4e-5, constant.
    """

    trains = "all"

    def __init__(
        self, spec: CheersSpec | None = None, lr: float = 4e-5, schedule: str = "constant", **kwargs
    ):
        super().__init__(spec=spec, lr=lr, schedule=schedule, **kwargs)
