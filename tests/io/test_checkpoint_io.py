"""Atomic checkpoints: a kill in the middle of a checkpoint write loses nothing that was saved.

A real tiny ``cheers fit`` (checkpoints every 2 steps, each also written as ``last.ckpt``) is
SIGKILLed halfway through writing ``last.ckpt`` at step 4: ``last.ckpt`` must still be the
complete step-2 checkpoint, loadable with ``weights_only=True``, and a resume from it must run
to the end (and clear the partial file). Plus the IO's own contract, in process.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cheers_pl.cli import main
from cheers_pl.io.checkpoint_io import CheersCheckpointIO
from tests.helpers import tiny_fit_args

ROOT = Path(__file__).resolve().parents[2]


def test_kill_while_writing_last_leaves_the_previous_checkpoint(tmp_path):
    demo, run = tmp_path / "demo", tmp_path / "run"
    run.mkdir()
    assert main(["data", "demo", "--out", str(demo), "--digits", "20", "--texts", "10"]) == 0
    env = {**os.environ, "CHEERS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # saves: step=2 (1), last (2), step=4 (3), last (4): die halfway through the 4th
    child = [sys.executable, str(ROOT / "tests/io/kill_on_save.py"), "4", *tiny_fit_args(run, demo, 6)]
    proc = subprocess.run(child, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]

    folder = run / "checkpoints"
    partial = list(folder.glob(".last.ckpt.partial-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the write was really cut mid-way
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # the previous complete checkpoint, not the interrupted one
    step4 = torch.load(folder / "epoch=0-step=4.ckpt", map_location="cpu", weights_only=True)
    assert step4["global_step"] == 4  # the file written before the kill is complete too

    assert main([*tiny_fit_args(run, demo, 6), "--ckpt_path", str(folder / "last.ckpt")]) == 0
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(folder.glob(".*.partial-*"))


def test_save_is_a_rename_of_a_complete_file(tmp_path):
    io = CheersCheckpointIO()
    target = tmp_path / "deep" / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(3.0), "step": 1}, target)
    inode = target.stat().st_ino
    io.save_checkpoint({"w": torch.arange(4.0), "step": 2}, target)
    assert target.stat().st_ino != inode  # replaced by a new file, never rewritten in place
    assert io.load_checkpoint(target)["step"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


class Marker:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_load_refuses_code_in_a_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "payload": Marker(marker)}, f)
    with pytest.raises(RuntimeError, match="evil.ckpt holds objects other than tensors"):
        CheersCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        CheersCheckpointIO().load_checkpoint(tmp_path / "nothing.ckpt")
