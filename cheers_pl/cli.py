"""The ``cheers`` command (also ``python -m cheers_pl``): thin subcommands over plain functions."""

from __future__ import annotations

import argparse
import os
import sys

from cheers_pl import __version__


def cmd_flavors(args: argparse.Namespace) -> int:
    """Print every component kind and its flavors."""
    from cheers_pl import registry

    for kind in registry.kinds():
        names = ", ".join(
            f"{name} ({f.doc})" if f.doc else name for name, f in registry.COMPONENTS[kind].items()
        )
        print(f"{kind:18s} {names}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Resolve a preset spec, build it on the meta device (no memory) and print its sizes."""
    import torch

    from cheers_pl.model import CheersModel, parameter_summary
    from cheers_pl.spec import CheersSpec

    spec = getattr(CheersSpec, args.preset)(hfi=args.hfi, pixel_reconstruct=args.pixel_reconstruct)
    with torch.device("meta"):
        model = CheersModel(spec)
    side, channels, n = model.latent_side, model.latent_channels, model.tokens_per_image
    print(f"image {model.image_size}px -> z1 ({channels}, {side}, {side}); {n} LLM tokens")
    for name, total, trainable in parameter_summary(model):
        print(f"{name:18s} {total:>15,d} params  {trainable:>15,d} trainable")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """Build a tiny CheersModel, train one step, generate an image and answer a question."""
    from cheers_pl.smoke import run_smoke

    report = run_smoke(steps=args.steps, seed=args.seed, out=args.out)
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0


def _add_data_commands(parser: argparse.ArgumentParser) -> None:
    from data_recipes.cli import add_commands

    add_commands(parser.add_subparsers(dest="recipe", metavar="RECIPE"))


LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def build_parser() -> argparse.ArgumentParser:
    epilog = (
        "YAML runs: cheers fit -c experiments/stage1_alignment.yaml [-c experiments/tiny.yaml] (LightningCLI)"
    )
    parser = argparse.ArgumentParser(
        prog="cheers", description="CHEERS experiment kit (PyTorch Lightning).", epilog=epilog
    )
    parser.add_argument("--version", action="version", version=f"cheers-pl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `cheers {name} --help`)", add_help=False)
    p = sub.add_parser("flavors", help="list component kinds and their flavors")
    p.set_defaults(func=cmd_flavors)
    p = sub.add_parser(
        "demo", help="the demo: stage I then II, tiny, on the bundled data, on CPU", add_help=False
    )
    sub.add_parser(
        "sweep", help="a base stage under a list of ablation overlays, with a results table", add_help=False
    )
    p = sub.add_parser("data", help="build WebDataset shards from datasets (recipes)")
    p.set_defaults(func=lambda _: p.print_help() or 0)
    _add_data_commands(p)
    p = sub.add_parser("info", help="parameter counts and sizes of a preset (built on the meta device)")
    p.add_argument("--preset", choices=["tiny", "paper"], default="paper")
    p.add_argument("--hfi", choices=["gated", "none"], default="gated")
    p.add_argument("--pixel-reconstruct", choices=["decode", "latent"], default="decode")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("smoke", help="tiny model on CPU: train steps, generate, answer")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps on one fixed batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the generated image as PNG here")
    p.set_defaults(func=cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("CHEERS_NUM_THREADS"):  # e.g. 1 for tiny CPU runs (make stageN PRESET=tiny)
        import torch

        torch.set_num_threads(int(os.environ["CHEERS_NUM_THREADS"]))
    if argv and argv[0] in ("demo", "sweep"):  # own argparse parsers
        from importlib import import_module

        return import_module(f"cheers_pl.{argv[0]}").main(argv[1:])
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:  # YAML runs go to LightningCLI
        from cheers_pl.lightning_cli import run

        run(argv)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
