"""Lightning callbacks for CHEERS training runs."""

from cheers_pl.callbacks.previews import PreviewCallback

__all__ = ["PreviewCallback"]
