"""Stage I, vision-language alignment (DESIGN section 5)."""

from __future__ import annotations

from cheers_pl.spec import CheersSpec
from cheers_pl.stages.base import CheersModule


class AlignmentStage(CheersModule):
    """Stage I, vision-language alignment (DESIGN section 5).

    Trains only what CHEERS adds: the understanding projector, the CFM head (with its HFI gate
    and time embedding) and the embedding rows of the added tokens (the LM head is tied to
    them); the LLM, SigLIP and the pixel decoder stay frozen. LR 1e-4, constant.
    """

    trains = "new"

    def __init__(
        self, spec: CheersSpec | None = None, lr: float = 1e-4, schedule: str = "constant", **kwargs
    ):
        super().__init__(spec=spec, lr=lr, schedule=schedule, **kwargs)
