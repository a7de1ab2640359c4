"""Fault cases of distributed runs (issue 14, item 11): ranks that see different tasks, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.faults.case import REPO, Case, Outcome, cheers, last_line

SMALL_DEMO = ["--digits", "20", "--texts", "4", "--reading", "0", "--heldout-reading", "0", "--no-judge"]


def demo_data(tmp: Path) -> Path:
    """A small demo data set under ``tmp`` (every task: understanding, generation, text)."""
    out = tmp / "data"
    r = cheers(["data", "demo", "--out", str(out), *SMALL_DEMO])
    if r.rc != 0:
        raise RuntimeError(f"cheers data demo: rc {r.rc}: {last_line(r.text)}")
    return out


def _overlay(tmp: Path, run: Path) -> Path:
    """Checkpoints only: one every step (the test's sign that a step ran) and a ``last.ckpt`` that
    only SIGTERM writes."""
    path = tmp / "overlay.yaml"
    path.write_text(
        f"""trainer:
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/every_step, every_n_train_steps: 1, save_top_k: 1}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, every_n_train_steps: 100000, save_last: true}}
"""
    )
    return path


def sigterm_fit(tmp: Path, devices: int = 2) -> tuple[int | None, int | None, str]:
    """Start a tiny stage-I ``cheers fit`` on ``devices`` CPU ranks, SIGTERM its main process after the
    first step; (exit code or None if it did not end in 120 s, last.ckpt's global_step, the log)."""
    import torch

    data, run = demo_data(tmp), tmp / "run"
    cmd = [sys.executable, "-m", "cheers_pl", "fit", "-c", "experiments/stage1_alignment.yaml"]
    cmd += ["-c", "experiments/tiny.yaml", "-c", str(_overlay(tmp, run)), "--data.root", str(data)]
    cmd += ["--trainer.default_root_dir", str(run), "--trainer.max_steps", "100000", "--data.batch_size", "2"]
    cmd += ["--run_folder", "fixed"]  # checkpoints straight in run/ (versioned: tests/io/test_run_folder.py)
    cmd += ["--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto"]
    log_path = tmp / "fit.log"
    with open(log_path, "w") as log:
        env = {**os.environ, "CHEERS_NUM_THREADS": "1"}
        p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        start = time.monotonic()
        while not list((run / "every_step").glob("*.ckpt")) and p.poll() is None:
            if time.monotonic() - start > 300:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = None
    last = run / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"] if last.exists() else None
    return rc, step, log_path.read_text(errors="replace")


def sigterm(tmp: Path) -> Outcome:
    rc, step, log = sigterm_fit(tmp, devices=2)
    saved = [ln for ln in log.splitlines() if "SIGTERM: saved" in ln]
    detail = f"rc {rc}, last.ckpt at step {step}; {saved[-1] if saved else last_line(log)}"
    return Outcome(rc == 143 and step is not None, detail)


def ranks_see_different_tasks(tmp: Path) -> Outcome:
    """The reported command: stage IV (mixture: batch) on 2 DDP ranks, tiny, a few steps."""
    data = demo_data(tmp)
    r = cheers(
        [
            "fit", "-c", "experiments/stage4_sft.yaml", "-c", "experiments/tiny.yaml",
            "--model.init_args.init_from", "null", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--data.root", str(data), "--trainer.default_root_dir", str(tmp / "run"),
            "--trainer.max_steps", "4", "--data.batch_size", "2",
            "--model.init_args.collective_timeout_s", "60",
        ],
        timeout=300,
    )  # fmt: skip
    line = next((ln for ln in r.text.splitlines() if "max_steps=4" in ln), last_line(r.text))
    return Outcome(r.rc == 0, f"rc {r.rc}: {line.strip()}")


CASES = [
    Case(
        "ddp-mixed-tasks",
        11,
        "stage IV on 2 DDP ranks: one rank's batch generation, the other's understanding/text",
        "every module runs on every rank (idle pass x 0): no hang",
        ranks_see_different_tasks,
    ),
    Case(
        "sigterm-ddp",
        11,
        "SIGTERM to a 2-rank cheers fit after its first step",
        "stop at the next batch, last.ckpt saved, exit 143",
        sigterm,
    ),
]
