"""Lightning callbacks for CHEERS training runs."""

from cheers_pl.callbacks.data_stats import DataStatsCallback
from cheers_pl.callbacks.demo_eval import DemoEvalCallback
from cheers_pl.callbacks.hfi_heatmap import HFIHeatmapCallback
from cheers_pl.callbacks.previews import PreviewCallback
from cheers_pl.callbacks.progress import CheersProgressBar, ThroughputLog
from cheers_pl.callbacks.sensitivity import SensitivityCallback

__all__ = [
    "CheersProgressBar",
    "DataStatsCallback",
    "DemoEvalCallback",
    "HFIHeatmapCallback",
    "PreviewCallback",
    "SensitivityCallback",
    "ThroughputLog",
]
