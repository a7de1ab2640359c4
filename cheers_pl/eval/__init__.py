"""In-kit evaluation metrics for CHEERS generations."""

from cheers_pl.eval.clip_score import CLIPScorer, clip_score_or_none, save_folder, tiny_clip, tiny_clip_config

__all__ = ["CLIPScorer", "clip_score_or_none", "save_folder", "tiny_clip", "tiny_clip_config"]
