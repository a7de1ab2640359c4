"""Every `cheers` subcommand's --help: each option described, its default shown, a `cheers <sub>` prog."""

from __future__ import annotations

import argparse
from importlib import import_module

import pytest

from cheers_pl.cli import COMMANDS, LIGHTNING_SUBCOMMANDS
from cheers_pl.cli_help import HelpFormatter, RawDescriptionHelpFormatter, default_text, make_parser
from data_recipes.cli import RECIPES

ARGV = {"eval": ["demo"]}  # `cheers eval` dispatches to its benchmarks' parsers


class _Built(BaseException):  # not an Exception: no `except Exception` in a main swallows it
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _built_parser(monkeypatch, main, argv: list[str]) -> argparse.ArgumentParser:
    """The parser ``main(argv)`` builds, caught as it starts to parse (nothing runs)."""

    def capture(self, args=None, namespace=None):
        raise _Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Built) as caught:
        main(argv)
    monkeypatch.undo()
    return caught.value.parser


def _walk(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _problems(parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    if not parser.prog.startswith("cheers "):
        problems.append(f"prog {parser.prog!r} does not start with 'cheers '")
    if not issubclass(parser.formatter_class, HelpFormatter | RawDescriptionHelpFormatter):
        problems.append(f"{parser.prog}: not built by cheers_pl.cli_help (defaults not shown)")
        return problems
    text = _flat(parser.format_help())
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{parser.prog} {name}: no help text")
            continue
        shown = default_text(action)
        if shown is not None and f"(default: {_flat(shown)})" not in text:
            problems.append(f"{parser.prog} {name}: default {action.default!r} not shown")
    return problems


def _commands():
    for name, (target, _) in COMMANDS.items():
        if name not in LIGHTNING_SUBCOMMANDS:
            yield pytest.param(name, target, ARGV.get(name, []), id=name)
    for name, (module, _) in RECIPES.items():  # python -m data_recipes.NAME
        yield pytest.param(f"data {name}", f"{module.__name__}:main", [], id=f"recipe-{name}")


@pytest.mark.parametrize(("name", "target", "argv"), _commands())
def test_every_option_has_help_and_shows_its_default(monkeypatch, name, target, argv):
    module, function = target.split(":")
    parser = _built_parser(monkeypatch, getattr(import_module(module), function), argv)
    problems = [p for sub in _walk(parser) for p in _problems(sub)]
    assert not problems, "\n".join(problems)
    if name == "data":
        assert {sub.prog for sub in _walk(parser)} >= {f"cheers data {r}" for r in RECIPES}


def test_the_formatter_shows_defaults_but_not_for_flags_none_or_named_ones():
    parser = make_parser("cheers x", "a test parser")
    parser.add_argument("--steps", type=int, default=80, help="Euler steps")
    parser.add_argument("--names", nargs="+", default=["a", "b"], help="names")
    parser.add_argument("--empty", default="", help="empty")
    parser.add_argument("--rate", default="50%", help="a rate")
    parser.add_argument("--out", default=None, help="folder")
    parser.add_argument("--overwrite", action="store_true", help="replace")
    parser.add_argument("--no-judge", dest="judge", action="store_false", help="skip the judge")
    parser.add_argument("--size", default="2GB", help="largest shard (default: %(default)s)")
    text = _flat(parser.format_help())
    assert "Euler steps (default: 80)" in text and "names (default: a b)" in text
    assert "empty (default: '')" in text and "a rate (default: 50%)" in text
    assert "folder (default" not in text and "replace (default" not in text and "judge (default" not in text
    assert text.count("(default: 2GB)") == 1
