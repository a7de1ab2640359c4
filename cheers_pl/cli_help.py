"""The parser every ``cheers`` subcommand builds: ``--help`` shows each option's default.

``make_parser("cheers sweep", doc)`` is an :class:`argparse.ArgumentParser` whose formatter appends
``(default: X)`` to an option's help when the option has a default worth showing: not ``None``, not
suppressed, not a flag (``store_true`` and the like, whose default is just "off"), and not already
named in the help text.
"""

from __future__ import annotations

import argparse
from typing import Any


def default_text(action: argparse.Action) -> str | None:
    """What ``--help`` shows as the default of ``action``, or None when it shows none."""
    default = action.default
    if default is None or default is argparse.SUPPRESS or action.nargs == 0:  # nargs 0: flags, --help
        return None
    if isinstance(default, list | tuple):
        return " ".join(str(v) for v in default) if default else "none"
    text = str(default)
    return text if text else "''"


class _DefaultsMixin:
    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shown = default_text(action)
        if shown is None or "%(default)" in help_text or "(default" in help_text:
            return help_text
        return f"{help_text} (default: {shown.replace('%', '%%')})"


class HelpFormatter(_DefaultsMixin, argparse.HelpFormatter):
    """Wraps the description; options show their defaults."""


class RawDescriptionHelpFormatter(_DefaultsMixin, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; options show their defaults."""


def make_parser(
    prog: str, description: str | None = None, raw_description: bool = False, **kwargs: Any
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` named ``prog`` (``cheers <sub>``) whose ``--help`` shows the defaults."""
    formatter = RawDescriptionHelpFormatter if raw_description else HelpFormatter
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter, **kwargs)
