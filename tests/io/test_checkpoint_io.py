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


# -- integrity, full disk, live writers (issue 14, items 3 and 10) -----------------------------------
def test_a_flipped_bit_is_refused_naming_the_file(tmp_path):
    import warnings

    from cheers_pl.io.export import load_checkpoint as export_load
    from cheers_pl.io.integrity import CheckpointCorruptError
    from cheers_pl.stages.weights import read_state_dict
    from tests.io.corrupt import flip_a_tensor_bit

    io, path = CheersCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"model.w": torch.arange(256.0)}, "global_step": 3}, path)
    assert "integrity" in torch.load(path, weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hashed checkpoint loads without a warning
        assert io.load_checkpoint(path)["global_step"] == 3
    flip_a_tensor_bit(path)
    assert torch.load(path, weights_only=True)["global_step"] == 3  # torch alone does not notice
    for load in (io.load_checkpoint, read_state_dict, export_load):  # --ckpt_path, init_from, export
        with pytest.raises(CheckpointCorruptError, match=r"checkpoint .*last.ckpt is corrupt"):
            load(path)


def test_a_checkpoint_without_a_hash_loads_with_a_warning(tmp_path):
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "global_step": 1}, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match=r"old.ckpt has no integrity hash"):
        assert CheersCheckpointIO().load_checkpoint(tmp_path / "old.ckpt")["global_step"] == 1


def test_a_cut_file_is_refused_naming_the_file(tmp_path):
    from cheers_pl.io.integrity import CheckpointCorruptError

    path = tmp_path / "last.ckpt"
    CheersCheckpointIO().save_checkpoint({"w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(CheckpointCorruptError, match=r"last.ckpt cannot be read"):
        CheersCheckpointIO().load_checkpoint(path)


class FullDisk:
    """A file opened for writing that fails with ENOSPC after ``room`` bytes, as a full disk does."""

    def __init__(self, path, mode, room: int):
        self.f, self.room = open(path, mode), room  # noqa: SIM115

    def write(self, data) -> int:
        if self.room < len(data):
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    from cheers_pl.io import checkpoint_io

    io, target = CheersCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(10.0), "global_step": 2}, target)
    monkeypatch.setattr(checkpoint_io, "open", lambda p, m: FullDisk(p, m, room=2000), raising=False)
    with pytest.raises(checkpoint_io.DiskFullError) as err:
        io.save_checkpoint({"w": torch.arange(10_000.0), "global_step": 4}, target)
    text = str(err.value)
    assert "\n" not in text and str(target.parent) in text and "previous last.ckpt there is intact" in text
    assert "enforce fail" not in text and err.value.__cause__ is None and err.value.__suppress_context__
    monkeypatch.undo()
    assert io.load_checkpoint(target)["global_step"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no partial left


def test_a_live_writers_partial_file_is_never_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        target = tmp_path / "last.ckpt"
        ours = tmp_path / f".last.ckpt.partial-{live.pid}"
        stale = tmp_path / f".last.ckpt.partial-{dead.pid}"
        ours.write_bytes(b"being written")
        stale.write_bytes(b"left by a killed writer")
        CheersCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, target)
        assert ours.read_bytes() == b"being written"
        assert not stale.exists()
    finally:
        live.kill()
        live.wait()
