"""``cheers fit | validate | test | predict``: the Lightning CLI over the stage modules and the DataModule.

YAML experiments are LightningCLI configs (``experiments/``). The parser runs in ``omegaconf+``
mode, so ``${trainer.default_root_dir}``-style references are resolved after every config file
and command-line override is merged: an overlay or ``--trainer.default_root_dir`` moves the
logs, checkpoints and stage hand-off paths together. The resolved config is saved beside the
logs (``config.yaml``) and reruns as it is.
"""

from __future__ import annotations

import jsonargparse
from lightning.pytorch.cli import LightningCLI

from cheers_pl.data.datamodule import CheersDataModule
from cheers_pl.stages.base import CheersModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run(argv: list[str]) -> LightningCLI:
    """Run LightningCLI on ``argv`` (starting with a subcommand)."""
    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return LightningCLI(
        CheersModule,
        CheersDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=argv,
    )


def main(argv: list[str]) -> int:
    """``cheers fit ...`` etc.: ``argv`` starts with the subcommand."""
    run(argv)
    return 0
