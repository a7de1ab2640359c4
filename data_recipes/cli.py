"""The recipes as subcommands (mounted by the kit as ``cheers data ...``; also ``python -m data_recipes``)."""

from __future__ import annotations

import argparse
import functools

from cheers_pl.cli_help import HelpFormatter, make_parser
from data_recipes import captions, demo, imagefolder, llava, text
from data_recipes.common import run_and_print

RECIPES = {
    "demo": (demo, "build the bundled demo set from skimage photos and sklearn digits (offline)"),
    "llava": (llava, "convert LLaVA-style chat records (JSON list or JSONL) of any task"),
    "captions": (captions, "convert image-caption pairs (JSONL, CSV or parquet) to captioning / t2i"),
    "imagefolder": (imagefolder, "convert a class-folder image tree plus captions to t2i samples"),
    "text": (text, "convert text-only chats (JSONL) to text samples"),
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register every recipe as a subcommand whose ``func(args)`` runs it and prints a summary."""
    for name, (module, help_line) in RECIPES.items():
        description = (module.__doc__ or "").split("\n\n")[0]
        parser = subparsers.add_parser(
            name, help=help_line, description=description, formatter_class=HelpFormatter
        )
        module.add_arguments(parser)
        parser.set_defaults(func=functools.partial(run_and_print, module.run))


def build_parser() -> argparse.ArgumentParser:
    """The ``cheers data`` parser (also ``python -m data_recipes``)."""
    parser = make_parser("cheers data", __doc__)
    add_commands(parser.add_subparsers(dest="recipe", metavar="RECIPE", help="the recipe to run"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one recipe; with no recipe, print the help."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recipe is None:
        parser.print_help()
        return 0
    return args.func(args)
