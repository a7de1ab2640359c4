"""Fault cases of the data group (issue 14, items 1, 5, 7 and 10's repeated tar keys).

Items 1, 5 and 10 share one faulty run (made once per process): the tiny stage II for 4 steps on
the demo shards, with the understanding task reading one shard that holds a 100k-character
caption and a key that comes back later in the shard.
"""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from tests.data.shardkit import raw_members, sample, write_raw
from tests.faults.case import REPO, Case, Outcome, Result, cheers, last_line
from tests.helpers import tiny_fit_args

STATS = "cheers_pl.callbacks.DataStatsCallback"


@functools.cache
def faulty_run() -> tuple[Result, Path]:
    """(the ``cheers fit`` result, its run folder) of the shared faulty run (module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="fault-data-"))
    atexit.register(shutil.rmtree, tmp, True)
    demo, run = tmp / "demo", tmp / "run"
    made = cheers(["data", "demo", "--out", str(demo), "--digits", "10", "--texts", "10"])
    assert made.rc == 0, made.text[-2000:]
    long = sample("understanding", 99)
    long.messages[1]["content"] = ("a very long caption " * 5000)[:100_000]
    rows = [raw_members(sample("understanding", i)) for i in range(6)]
    (tmp / "long").mkdir()
    write_raw(tmp / "long" / "long.tar", [rows[0], raw_members(long), rows[0], *rows[1:]])
    args = tiny_fit_args(run, demo, steps=4, every=4, extra_callbacks=f"    - class_path: {STATS}\n")
    overlay = run / "faulty.yaml"
    tb = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(run)}}
    tasks = {
        "understanding": {"shards": [str(tmp / "long")], "ratio": 3},
        "generation": {"shards": ["generation/"], "ratio": 6},
        "text": {"shards": ["text/"], "ratio": 1},
    }
    overlay.write_text(
        yaml.safe_dump({"trainer": {"logger": tb}, "data": {"tasks": tasks, "shuffle_buffer": 0}})
    )
    return cheers([*args, "-c", str(overlay)]), run


def _counter(text: str, key: str) -> int:
    found = re.search(rf"^\s+{re.escape(key)}\s+(\d+)$", text, re.M)
    return int(found.group(1)) if found else 0


def long_caption(tmp: Path) -> Outcome:
    result, run = faulty_run()
    skipped = _counter(result.out, "skipped/understanding/too_long")
    ok = result.rc == 0 and skipped >= 1 and (run / "checkpoints" / "last.ckpt").is_file()
    return Outcome(ok, f"rc {result.rc}; last.ckpt written; skipped/understanding/too_long {skipped}")


def stats_visible(tmp: Path) -> Outcome:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, run = faulty_run()
    heads = [ln for ln in result.out.splitlines() if ln.startswith("data: skipped, repaired or dropped")]
    head = heads[0] if heads else ""
    scalars: list[str] = []
    for version in sorted(run.glob("lightning_logs/version_*")):
        acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
        acc.Reload()
        scalars += [t for t in acc.Tags()["scalars"] if t.startswith("data/")]
    ok = result.rc == 0 and bool(head) and bool(scalars)
    return Outcome(ok, f"summary: {head or '(none)'}; TensorBoard: {len(scalars)} data/* scalars")


def duplicate_key(tmp: Path) -> Outcome:
    result, _ = faulty_run()
    n = _counter(result.out, "duplicate_key/understanding")
    return Outcome(result.rc == 0 and n >= 1, f"rc {result.rc}; duplicate_key/understanding {n} (skipped)")


def _refused(option: list[str], key: str) -> Outcome:
    configs = [
        a for c in ("stage1_alignment.yaml", "tiny.yaml") for a in ("-c", str(REPO / "experiments" / c))
    ]
    result = cheers(["fit", *configs, *option, "--trainer.max_steps", "1"])
    lines = [ln.strip() for ln in result.err.splitlines()]
    why = next((ln for ln in lines if "restriction" in ln or "Expected a" in ln), last_line(result.err))
    ok = result.rc == 2 and f'Parser key "{key}"' in result.err
    return Outcome(ok, f"rc {result.rc}: {key}: {why}")


CASES = [
    Case(
        "data-100k-caption",
        1,
        "a 100k-character caption in a training shard",
        "train on; skip and count it (spec.max_length in every stage)",
        long_caption,
    ),
    Case(
        "data-stats-visible",
        5,
        "a run with skipped samples and repeated keys",
        "counts in TensorBoard data/*, the progress bar and an end-of-fit summary",
        stats_visible,
    ),
    Case(
        "data-cfg-dropout-2",
        7,
        "`--data.cfg_dropout 2.0`",
        "parse error naming the key and [0, 1]",
        lambda tmp: _refused(["--data.cfg_dropout", "2.0"], "data.cfg_dropout"),
    ),
    Case(
        "data-shuffle-buffer-negative",
        7,
        "`--data.shuffle_buffer -5`",
        "parse error naming the key and >= 0",
        lambda tmp: _refused(["--data.shuffle_buffer", "-5"], "data.shuffle_buffer"),
    ),
    Case(
        "data-duplicate-key",
        10,
        "a tar whose key comes back later in the shard",
        "skip and count the repeat (duplicate_key/<task>)",
        duplicate_key,
    ),
]
