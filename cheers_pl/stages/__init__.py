"""The four training stages (DESIGN section 5), each a small subclass of :class:`CheersModule`."""

from cheers_pl.stages.alignment import AlignmentStage
from cheers_pl.stages.base import CheersModule
from cheers_pl.stages.pretrain import PretrainStage
from cheers_pl.stages.refined import RefinedStage
from cheers_pl.stages.sft import SFTStage

STAGES = {"stage1": AlignmentStage, "stage2": PretrainStage, "stage3": RefinedStage, "stage4": SFTStage}

__all__ = ["STAGES", "AlignmentStage", "CheersModule", "PretrainStage", "RefinedStage", "SFTStage"]
