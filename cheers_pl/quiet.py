"""Known-harmless warnings and notices of the kit's dependencies, filtered by message.

``cheers`` (every subcommand) calls :func:`quiet_known_noise` once at start. Each entry below is
a message the kit cannot avoid and that says nothing about the run; anything else still shows.
Filtering is by message (regular expression matched at the start), never by whole category or
module, so a new warning from the same place is not hidden. ``CHEERS_SHOW_ALL_WARNINGS=1``
turns the filters off.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (message regex, why it is harmless here)
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"'set_vital' is deprecated", "torchdata's StatefulDataLoader calls a deprecated torch hook itself"),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own pytree helper on torch >= 2.10; nothing of the kit's",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "the frozen VAE and towers are in eval mode on purpose (stages/freezing.py)",
    ),
)
# (logger name, message regex, why): notices printed through logging rather than warnings
KNOWN_LOG_LINES: tuple[tuple[str, str, str], ...] = (
    (
        "lightning.pytorch.utilities.rank_zero",  # rank_zero_info of the logger connector
        r".*Tip: For seamless cloud logging",
        "an advertisement for a cloud logger, printed on every Trainer",
    ),
)


class _DropMessages(logging.Filter):
    """A logging filter that drops records whose message matches one of ``patterns``."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def quiet_known_noise() -> None:
    """Install the filters of :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_LINES` (idempotent)."""
    if os.environ.get("CHEERS_SHOW_ALL_WARNINGS") == "1":
        return
    for pattern, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in KNOWN_LOG_LINES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
