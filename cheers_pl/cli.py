"""The ``cheers`` command (also ``python -m cheers_pl``): a table of subcommands over plain functions.

Each subcommand is ``module:function(argv) -> exit code`` with its own parser (``--help``);
modules are imported only when their subcommand runs, so ``cheers --help`` stays instant.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

from cheers_pl import __version__

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
COMMANDS = {  # name: (target, help)
    **{n: ("cheers_pl.lightning_cli:main", f"LightningCLI {n}: YAML runs") for n in LIGHTNING_SUBCOMMANDS},
    "demo": ("cheers_pl.demo:main", "the demo: stage I then II, tiny, on the bundled data, on CPU"),
    "sweep": ("cheers_pl.sweep:main", "a base stage under ablation overlays, with a results table"),
    "paper-tables": ("cheers_pl.paper_tables:main", "Tables 5 and 6 and Figure 5b at tiny size, with seeds"),
    "data": ("data_recipes.cli:main", "build WebDataset shards from datasets (recipes)"),
    "generate": ("cheers_pl.inference:main_generate", "text-to-image, with a repro card"),
    "answer": ("cheers_pl.inference:main_answer", "answer questions about images"),
    "edit": ("cheers_pl.inference:main_edit", "zero-shot image editing (paper appendix B)"),
    "export": ("cheers_pl.io.export:main", "a checkpoint as a Hugging-Face-style folder"),
    "prepare": (
        "cheers_pl.io.paper_layout:main",
        "component downloads -> stage I's checkpoints/",
    ),
    "convert": ("cheers_pl.io.released:main", "the authors' released checkpoint into the kit"),
    "eval": ("cheers_pl.eval.demo_eval:main_eval", "in-kit evaluations: cheers eval demo --model CKPT"),
    "geneval": ("cheers_pl.eval.geneval:main", "GenEval image folder for its scorer"),
    "dpg": ("cheers_pl.eval.dpg:main", "DPG-Bench image folder for its scorer"),
    "flavors": ("cheers_pl.info:main_flavors", "list component kinds and their flavors"),
    "info": ("cheers_pl.info:main_info", "sizes and parameter counts of a preset (meta device)"),
    "smoke": ("cheers_pl.smoke:main", "tiny model on CPU: train steps, generate, answer"),
}


def usage() -> str:
    lines = [f"usage: cheers COMMAND [options]   (cheers-pl {__version__})", "", "commands:"]
    lines += [f"  {name:10s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "cheers COMMAND --help for a command's options; YAML runs:",
              "  cheers fit -c experiments/stage1_alignment.yaml [-c experiments/tiny.yaml]"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from cheers_pl.quiet import quiet_known_noise

    quiet_known_noise()  # known-harmless dependency warnings, by message (cheers_pl/quiet.py)
    if os.environ.get("CHEERS_NUM_THREADS"):  # e.g. 1 for tiny CPU runs (make stageN PRESET=tiny)
        import torch

        torch.set_num_threads(int(os.environ["CHEERS_NUM_THREADS"]))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"cheers-pl {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"cheers: unknown command {argv[0]!r}; valid commands are {list(COMMANDS)}", file=sys.stderr)
        return 2
    module, function = COMMANDS[argv[0]][0].split(":")
    rest = argv if argv[0] in LIGHTNING_SUBCOMMANDS else argv[1:]
    return getattr(import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
