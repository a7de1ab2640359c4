"""Analyses of a trained CHEERS model (HFI heat maps and intensities, Figure 5)."""

from cheers_pl.analysis.hfi import (
    NORMALISE_MODES,
    evenly_spaced_steps,
    heatmap_figure,
    intensity,
    intensity_curve,
    intensity_plot,
    normalise_per_run,
    save_gate_maps,
)

__all__ = [
    "NORMALISE_MODES",
    "evenly_spaced_steps",
    "heatmap_figure",
    "intensity",
    "intensity_curve",
    "intensity_plot",
    "normalise_per_run",
    "save_gate_maps",
]
