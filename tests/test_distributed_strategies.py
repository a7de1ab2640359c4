"""Every overlay in ``experiments/strategies`` parses through the kit's CLI on top of the stages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cheers_pl.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
OVERLAYS = sorted((EXPERIMENTS / "strategies").glob("*.yaml"))
EXPECTED = {  # overlay: (strategy class, init_args it sets, the model's gradient checkpointing)
    "deepspeed_zero2.yaml": ("cheers_pl.distributed.CheersDeepSpeedStrategy", {"stage": 2}, True),
    "deepspeed_zero3.yaml": (
        "cheers_pl.distributed.CheersDeepSpeedStrategy",
        {"stage": 3, "zero_init": False},
        True,
    ),
    "fsdp_sharded.yaml": (
        "cheers_pl.distributed.CheersFSDPStrategy",
        {"state_dict_type": "sharded", "activation_checkpointing": True},  # the stage's setting kept
        False,
    ),
}


def test_every_overlay_is_checked():
    assert [p.name for p in OVERLAYS] == sorted(EXPECTED)


def printed_config(capsys, *configs: Path) -> dict:
    args = ["fit"]
    for config in configs:
        args += ["-c", str(config)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out  # less the log lines deepspeed prints when first imported
    return yaml.safe_load(re.sub(r"(?m)^\[\d{4}-\d\d-\d\d .*\n", "", out))


STAGES = ["stage1_alignment.yaml", "stage2_pretrain.yaml", "stage3_refined.yaml", "stage4_sft.yaml"]


@pytest.mark.parametrize("i", range(len(OVERLAYS)), ids=[p.stem for p in OVERLAYS])
def test_overlay_parses_on_a_stage(i, capsys):
    overlay, stage = OVERLAYS[i], STAGES[i % len(STAGES)]  # each overlay on another stage
    class_path, init_args, checkpointing = EXPECTED[overlay.name]
    config = printed_config(capsys, EXPERIMENTS / stage, overlay)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == class_path
    assert init_args.items() <= strategy["init_args"].items()
    if "DeepSpeed" in class_path:  # FSDP's option does not follow the class change
        assert "activation_checkpointing" not in strategy["init_args"]
    assert config["model"]["init_args"]["gradient_checkpointing"] is checkpointing
    assert config["trainer"]["gradient_clip_val"] == 1.0 and config["trainer"]["num_nodes"] == 16


def test_fsdp_overlay_builds_a_sharded_strategy():
    from cheers_pl.distributed import CheersFSDPStrategy

    _, init_args, _ = EXPECTED["fsdp_sharded.yaml"]
    strategy = CheersFSDPStrategy(**init_args)
    assert strategy._state_dict_type == "sharded" and strategy._activation_checkpointing_kwargs


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_overlay_builds_its_strategy(stage):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed==0.19.8)")
    from cheers_pl.distributed import CheersDeepSpeedStrategy

    with open(EXPERIMENTS / "strategies" / f"deepspeed_zero{stage}.yaml") as f:
        init_args = yaml.safe_load(f)["trainer"]["strategy"]["init_args"]
    strategy = CheersDeepSpeedStrategy(**init_args)
    assert strategy.config["zero_optimization"]["stage"] == stage and strategy.zero_init is False


def test_deepspeed_micro_batch_size_without_a_batch_sampler():
    """The kit's loaders batch inside the dataset (no batch sampler): Lightning's guess of DeepSpeed's
    micro-batch size fails on them (AttributeError); the strategy takes the DataModule's."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed==0.19.8)")
    from types import SimpleNamespace

    from cheers_pl.distributed import CheersDeepSpeedStrategy

    strategy = CheersDeepSpeedStrategy(stage=2)
    loader = SimpleNamespace(batch_sampler=None, batch_size=None)
    source = SimpleNamespace(is_defined=lambda: True, dataloader=lambda: loader)
    fit_loop = SimpleNamespace(_data_source=source)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=6), fit_loop=fit_loop)
    strategy._lightning_module = SimpleNamespace(trainer=trainer)
    assert strategy._auto_select_batch_size() == 6
    trainer.datamodule = None
    assert strategy._auto_select_batch_size() == 1
