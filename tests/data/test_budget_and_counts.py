"""Issue 14, items 1, 5 and 7: every stage has a token budget, and a real tiny fit on a shard holding
a 100k-character caption trains on, skipping and counting it, with the counts in TensorBoard, the
progress bar's metrics and the summary printed at the end of fit; data options out of their range
are parse errors."""

import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cheers_pl.cli import main
from tests.data.shardkit import raw_members, sample, write_raw
from tests.helpers import REPO, tiny_fit_args

STAGES = ["stage1_alignment.yaml", "stage2_pretrain.yaml", "stage3_refined.yaml", "stage4_sft.yaml"]
CALLBACK = "cheers_pl.callbacks.DataStatsCallback"


def printed_config(capsys, *configs: str) -> dict:
    args = [a for c in configs for a in ("-c", str(REPO / "experiments" / c))]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("tiny", [False, True])
def test_every_stage_has_a_token_budget_a_too_long_policy_and_the_data_stats_callback(stage, tiny, capsys):
    cfg = printed_config(capsys, stage, *(["tiny.yaml"] if tiny else []))
    budget = cfg["model"]["init_args"]["spec"]["max_length"]
    assert isinstance(budget, int) and (budget == 256 if tiny else budget >= 1024), budget
    assert cfg["data"]["too_long"] == "skip"
    assert [c for c in cfg["trainer"]["callbacks"] if c["class_path"] == CALLBACK]


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--data.cfg_dropout", "2.0"], ['Parser key "data.cfg_dropout"', "restriction v>=0 and v<=1"]),
        (["--data.cfg_dropout", "nan"], ['Parser key "data.cfg_dropout"', "restriction v>=0 and v<=1"]),
        (["--data.shuffle_buffer", "-5"], ['Parser key "data.shuffle_buffer"', "restriction v>=0"]),
        (["--data.too_long", "cut"], ['Parser key "data.too_long"', "'skip', 'truncate'"]),
    ],
    ids=["cfg_dropout-2", "cfg_dropout-nan", "shuffle_buffer-negative", "too_long-unknown"],
)
def test_data_options_out_of_range_are_parse_errors(option, expected, capsys):
    configs = [
        "-c",
        str(REPO / "experiments/stage1_alignment.yaml"),
        "-c",
        str(REPO / "experiments/tiny.yaml"),
    ]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *configs, *option, "--print_config"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err


def long_caption_shard(folder: Path) -> str:
    """8 understanding samples, early in the shard: one with a 100k-character caption, then a key
    that comes back (both read within the first steps)."""
    long = sample("understanding", 99)
    long.messages[1]["content"] = ("a very long caption " * 5000)[:100_000]
    rows = [raw_members(sample("understanding", i)) for i in range(6)]
    folder.mkdir(parents=True)
    return write_raw(folder / "long.tar", [rows[0], raw_members(long), rows[0], *rows[1:]])


def test_a_tiny_fit_skips_counts_and_reports_a_100k_character_sample(tmp_path, capsys):
    from cheers_pl.lightning_cli import run

    demo, run_dir = tmp_path / "demo", tmp_path / "run"
    assert main(["data", "demo", "--out", str(demo), "--digits", "10", "--texts", "10"]) == 0
    long_caption_shard(tmp_path / "long")
    callback = f"    - class_path: {CALLBACK}\n      init_args:\n        every_n_steps: 2\n"
    args = tiny_fit_args(run_dir, demo, steps=4, every=4, extra_callbacks=callback)
    overlay = run_dir / "faulty.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": str(run_dir), "name": "tb"},
                    }
                },
                "data": {
                    "tasks": {
                        "understanding": {"shards": [str(tmp_path / "long")], "ratio": 3},
                        "generation": {"shards": ["generation/"], "ratio": 6},
                        "text": {"shards": ["text/"], "ratio": 1},
                    },
                    "shuffle_buffer": 0,
                },
            }
        )
    )
    capsys.readouterr()
    cli = run([*args, "-c", str(overlay)])
    assert cli.trainer.global_step == 4 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    stats = cli.datamodule.data_stats()
    assert stats["skipped/understanding/too_long"] == 1, stats
    assert stats["duplicate_key/understanding"] >= 1, stats
    pbar = cli.trainer.progress_bar_metrics
    assert pbar["data/skipped"] >= 1 and pbar["data/duplicate_key"] >= 1, pbar
    out = capsys.readouterr().out
    assert "data: skipped, repaired or dropped in this run" in out
    assert re.search(r"skipped/understanding/too_long +1\n", out), out
    acc = EventAccumulator(str(next((run_dir / "tb").glob("version_*"))), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"data/skipped/understanding/too_long", "data/duplicate_key/understanding"} <= set(
        acc.Tags()["scalars"]
    )
    assert acc.Scalars("data/skipped/understanding/too_long")[-1].value == 1
