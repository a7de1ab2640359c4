"""Lightning callbacks for CHEERS training runs."""

from cheers_pl.callbacks.hfi_heatmap import HFIHeatmapCallback
from cheers_pl.callbacks.previews import PreviewCallback

__all__ = ["HFIHeatmapCallback", "PreviewCallback"]
