"""Exact resume: a run killed with SIGKILL continues as if it had never stopped.

Three real ``cheers fit`` processes of the tiny stage II on demo shards (2 loader workers, fp32
on CPU, checkpoints every 2 steps): an uninterrupted run of STEPS steps; a run killed with
SIGKILL once it has logged KILL_AT steps; and the killed run resumed from its ``last.ckpt``.
The resumed steps must have the same losses (to TOL) and the same sample ids as the
uninterrupted run, and the final weights and optimiser state the same values: nothing of the
model, optimiser, schedule, random states or data position may be lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cheers_pl.cli import main
from tests.helpers import tiny_fit_args

ROOT = Path(__file__).resolve().parents[2]
STEPS, KILL_AT, EVERY = 10, 5, 2  # STEPS a multiple of EVERY: the last step is saved
TOL = dict(rtol=0.0, atol=1e-6)  # fp32 on CPU, one thread: in practice bit-identical

STEP_LOG = """    - class_path: tests.stages.step_log.StepLog
      init_args:
        path: ${trainer.default_root_dir}/steps.jsonl
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["data", "demo", "--out", str(out), "--digits", "30", "--texts", "20"]) == 0
    return out


def fit(run: Path, demo: Path, *extra: str) -> subprocess.Popen:
    args = tiny_fit_args(run, demo, STEPS, every=EVERY, workers=2, extra_callbacks=STEP_LOG)
    cmd = [sys.executable, "-m", "cheers_pl", *args, *extra]
    env = {**os.environ, "CHEERS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def steps(run: Path) -> list[dict]:
    path = run / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]


def state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, demo):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref_proc, kill_proc = fit(reference, demo), fit(killed, demo)
    deadline = time.monotonic() + 240
    while len(steps(killed)) < KILL_AT:
        assert kill_proc.poll() is None, kill_proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run to kill never reached its kill step"
        time.sleep(0.02)
    kill_proc.send_signal(signal.SIGKILL)
    kill_proc.wait(timeout=30)
    assert kill_proc.returncode == -signal.SIGKILL
    before = steps(killed)
    assert KILL_AT <= len(before) < STEPS  # killed mid-run
    saved = state(killed)["global_step"]
    assert 0 < saved <= len(before) and saved % EVERY == 0

    finish(fit(killed, demo, "--ckpt_path", "last"))
    finish(ref_proc)
    want, got = steps(reference), steps(killed)
    assert [r["step"] for r in want] == list(range(1, STEPS + 1))
    # the killed run's steps up to the kill, then the resumed run's from the checkpoint on
    assert [r["step"] for r in got] == [r["step"] for r in before] + list(range(saved + 1, STEPS + 1))
    resumed = got[len(before) :]
    for mine, theirs in zip(before + resumed, want[: len(before)] + want[saved:], strict=True):
        assert mine["step"] == theirs["step"] and mine["ids"] == theirs["ids"]
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=TOL["atol"])

    a, b = state(killed), state(reference)
    assert a["global_step"] == b["global_step"] == STEPS
    for name, tensor in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][name], tensor, **TOL, msg=name)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for pa, pb in zip(opt_a.values(), opt_b.values(), strict=True):
        for key in pb:
            torch.testing.assert_close(pa[key], pb[key], **TOL)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
