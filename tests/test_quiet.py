"""quiet_known_noise: the known-harmless dependency warnings go, every other one stays."""

import logging
import warnings

from cheers_pl.quiet import KNOWN_LOG_LINES, quiet_known_noise


def test_known_warnings_are_dropped_and_others_kept(monkeypatch):
    monkeypatch.delenv("CHEERS_SHOW_ALL_WARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning, stacklevel=1)
        warnings.warn("Found 193 module(s) in eval mode at the start of training.", UserWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use", DeprecationWarning, stacklevel=1)
        warnings.warn("Found a real problem in eval mode", UserWarning, stacklevel=1)
        warnings.warn("something else is deprecated", UserWarning, stacklevel=1)
    kept = ["Found a real problem in eval mode", "something else is deprecated"]
    assert [str(w.message) for w in seen] == kept


def test_the_litlogger_tip_is_dropped_but_its_logger_still_speaks(caplog):
    name = KNOWN_LOG_LINES[0][0]
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter
    logger = logging.getLogger(name)
    assert sum(type(f).__name__ == "_DropMessages" for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=name):
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        logger.info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]
