"""Fault cases of the checkpoint group (issue 14, items 2, 3, 6, 7's image size, 8 and 10).

Several cases share a stage hand-off made once per process: the tiny stage I for 2 steps, then
the tiny stage II for 2 steps from its ``last.ckpt``, whose file is then deleted (so the stage-II
checkpoint names an ``init_from`` that no longer exists, as after cleaning up a finished stage).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from tests.faults.case import REPO, Case, Outcome, cheers, last_line
from tests.helpers import tiny_fit_args
from tests.io.corrupt import flip_a_tensor_bit

TINY = ["-c", str(REPO / "experiments/tiny.yaml")]
STAGE1 = ["fit", "-c", str(REPO / "experiments/stage1_alignment.yaml"), *TINY]


@functools.cache
def demo() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="fault-ckpt-"))
    atexit.register(shutil.rmtree, tmp, True)
    made = cheers(["data", "demo", "--out", str(tmp / "demo"), "--digits", "10", "--texts", "10"])
    assert made.rc == 0, made.text[-2000:]
    return tmp / "demo"


def stage1_args(run: Path, steps: int = 2) -> list[str]:
    """``tiny_fit_args`` (stage II from scratch, checkpoints every 2 steps) turned into stage I."""
    args = tiny_fit_args(run, demo(), steps)
    stage2 = str(REPO / "experiments/stage2_pretrain.yaml")
    return [str(REPO / "experiments/stage1_alignment.yaml") if a == stage2 else a for a in args]


@functools.cache
def handoff() -> dict[str, Path]:
    """``{"stage2": its last.ckpt, "init_from": the deleted stage-I file, "run2": its folder}``."""
    tmp = demo().parent
    s1 = cheers(stage1_args(tmp / "stage1"))
    assert s1.rc == 0, s1.text[-2000:]
    first = tmp / "stage1" / "checkpoints" / "last.ckpt"
    s2 = cheers([*tiny_fit_args(tmp / "stage2", demo(), 2), "--model.init_args.init_from", str(first)])
    assert s2.rc == 0, s2.text[-2000:]
    first.unlink()
    return {
        "stage2": tmp / "stage2" / "checkpoints" / "last.ckpt",
        "init_from": first,
        "run2": tmp / "stage2",
    }


def _step(ckpt: Path) -> int | None:
    """The ``global_step`` of the checkpoint file ``ckpt`` (None when there is none)."""
    return torch.load(ckpt, weights_only=True)["global_step"] if ckpt.is_file() else None


def _refused(result, *needles: str) -> Outcome:
    """Held when the run failed (not killed) and its last line, whole, holds every needle."""
    line = (result.text.strip().splitlines() or [""])[-1]
    held = result.rc not in (0, -9) and all(n in line for n in needles)
    return Outcome(held, f"rc {result.rc}: {line.removeprefix('error: ')}")


# -- item 2 ------------------------------------------------------------------------------------------
def other_stage(tmp: Path) -> Outcome:
    ckpt = handoff()["stage2"]
    result = cheers([*STAGE1, "--trainer.default_root_dir", str(tmp / "run"), "--ckpt_path", str(ckpt)])
    return _refused(result, "stage II (PretrainStage)", "stage I (AlignmentStage)", "--allow_stage_switch")


# -- item 3 ------------------------------------------------------------------------------------------
def second_run(tmp: Path) -> Outcome:
    run = tmp / "run"
    env = {**os.environ, "CHEERS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cheers_pl", *tiny_fit_args(run, demo(), 10_000)]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run / ".cheers-fit.lock"
        deadline = time.monotonic() + 120
        while str(first.pid) not in (lock.read_text() if lock.exists() else ""):
            if time.monotonic() > deadline or first.poll() is not None:
                return Outcome(False, f"the first run never took the lock (rc {first.poll()})")
            time.sleep(0.5)
        result = cheers(tiny_fit_args(run, demo(), 4))
        alive = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    out = _refused(result, f"pid {first.pid}", str(run))
    return Outcome(out.ok and alive, out.detail + ("" if alive else " (the first run died)"))


def live_partial(tmp: Path) -> Outcome:
    run = tmp / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        partial = folder / f".last.ckpt.partial-{writer.pid}"
        partial.write_bytes(b"a live writer's half-written checkpoint")
        result = cheers(tiny_fit_args(run, demo(), 2))
        kept = partial.exists()
    finally:
        writer.kill()
        writer.wait()
    return Outcome(result.rc == 0 and kept, f"rc {result.rc}; live writer's partial file kept: {kept}")


# -- item 6 ------------------------------------------------------------------------------------------
def last_without_checkpoint(tmp: Path) -> Outcome:
    result = cheers([*STAGE1, "--trainer.default_root_dir", str(tmp / "run"), "--ckpt_path", "last"])
    return _refused(result, "no last.ckpt in", str(tmp / "run" / "checkpoints"))


# -- item 7 ------------------------------------------------------------------------------------------
def image_size(tmp: Path) -> Outcome:
    result = cheers([*STAGE1, "--trainer.default_root_dir", str(tmp / "run"), "--data.image_size", "64"])
    return _refused(result, "data.image_size=64", "model's image size is 32")


# -- item 8 ------------------------------------------------------------------------------------------
def resume_without_init_from(tmp: Path) -> Outcome:
    h = handoff()
    run = tmp / "stage2"
    shutil.copytree(h["run2"], run)
    result = cheers([*tiny_fit_args(run, demo(), 4), "--model.init_args.init_from", str(h["init_from"]),
                     "--ckpt_path", "last"])  # fmt: skip
    step, said = _step(run / "checkpoints" / "last.ckpt"), "is not loaded" in result.err
    line = next((ln for ln in result.err.splitlines() if "is not loaded" in ln), last_line(result.err))
    return Outcome(result.rc == 0 and step == 4 and said, f"rc {result.rc}, resumed to step {step}; {line}")


def missing_init_from(tmp: Path) -> Outcome:
    args = ["fit", "-c", str(REPO / "experiments/stage2_pretrain.yaml"), *TINY]
    result = cheers([*args, "--trainer.default_root_dir", str(tmp / "tiny" / "stage2")])
    return _refused(
        result,
        str(tmp / "tiny" / "stage1" / "latest" / "checkpoints" / "last.ckpt"),
        "make stage1 PRESET=tiny",
    )


# -- item 10 -----------------------------------------------------------------------------------------
def bit_flip(tmp: Path) -> Outcome:
    flipped = tmp / "flipped.ckpt"
    shutil.copy(handoff()["stage2"], flipped)
    flip_a_tensor_bit(flipped)
    args = tiny_fit_args(tmp / "run", demo(), 4)
    fit = cheers([*args, "--ckpt_path", str(flipped)])
    gen = cheers(["generate", "--model", str(flipped), "--prompt", "a digit 3", "--out", str(tmp / "gen")])
    a, b = _refused(fit, "flipped.ckpt is corrupt"), _refused(gen, "flipped.ckpt is corrupt")
    return Outcome(a.ok and b.ok, f"fit {a.detail}; generate {b.detail}")


FULL_DISK = """
import errno, os, sys
from cheers_pl.io import checkpoint_io
saves = []
class Full:
    def __init__(self, path, mode):
        self.f = open(path, mode)
        saves.append(path)
    def write(self, data):
        if len(saves) >= 4:  # step 2, its last.ckpt and step 4 fit; step 4's last.ckpt does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
checkpoint_io.open = Full
from cheers_pl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def disk_full(tmp: Path) -> Outcome:
    run = tmp / "run"
    script = tmp / "full_disk.py"
    script.write_text(textwrap.dedent(FULL_DISK))
    env = {**os.environ, "CHEERS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(script), *tiny_fit_args(run, demo(), 6)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    line = (p.stderr.strip().splitlines() or [""])[-1]  # whole: last_line cuts at 200 characters
    folder = run / "checkpoints"
    last, partials = _step(folder / "last.ckpt"), list(folder.glob(".*.partial-*"))
    ok = p.returncode not in (0, -9) and str(folder) in line and "intact" in line
    ok = ok and last == 2 and not partials
    return Outcome(ok, f"rc {p.returncode}, last.ckpt at step {last}, partials {len(partials)}: {line}")


CASES = [
    Case("ckpt-other-stage", 2, "stage I config, --ckpt_path of a stage-II checkpoint",
         "refuse naming both stages and the flag", other_stage),
    Case("two-runs-one-folder", 3, "a second `cheers fit` in a running fit's folder",
         "refuse naming the first run's pid", second_run),
    Case("live-partial-kept", 3, "another live writer's .last.ckpt.partial-PID in the folder",
         "never remove it; train", live_partial),
    Case("ckpt-last-none", 6, "--ckpt_path last with no checkpoint", "refuse naming the folder searched",
         last_without_checkpoint),
    Case("image-size-mismatch", 7, "data.image_size 64 on a 32-pixel model", "refuse at parse naming both",
         image_size),
    Case("resume-no-init-from", 8, "resume stage II after stage I's file was deleted",
         "resume without it, say so", resume_without_init_from),
    Case("init-from-missing", 8, "stage II from a stage-I file that does not exist",
         "refuse naming the file and `make stage1`", missing_init_from),
    Case("ckpt-bit-flip", 10, "one flipped bit in a tensor of a .ckpt (fit --ckpt_path, generate)",
         "refuse naming the file", bit_flip),
    Case("disk-full-save", 10, "ENOSPC while writing a checkpoint",
         "one line: the folder, previous last.ckpt intact", disk_full),
]  # fmt: skip
