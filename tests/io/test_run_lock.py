"""One ``cheers fit`` per run folder (issue 14, item 3): a second is refused naming the first's pid;
a lock left by a killed run is taken over, with a line saying whose it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cheers_pl.cli import main
from cheers_pl.io.run_lock import LOCK_NAME, RunFolderBusy, RunLock, is_launching_process

ROOT = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from cheers_pl.io.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"  # noqa: E501


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock, as a running ``cheers fit`` does."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_fit_in_the_folder_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    first = holder(run)
    try:
        args = [
            "fit",
            "-c",
            str(ROOT / "experiments/stage1_alignment.yaml"),
            "-c",
            str(ROOT / "experiments/tiny.yaml"),
        ]
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--trainer.default_root_dir", str(run)])
        text = str(exit_.value.code)
        assert f"run folder {run} is in use by another cheers fit (pid {first.pid}" in text
        assert "--trainer.default_root_dir" in text and "\n" not in text
        with pytest.raises(RunFolderBusy):
            RunLock(run).acquire()
    finally:
        first.kill()
        first.wait()


def test_a_killed_runs_lock_is_taken_over_with_a_line(tmp_path, capsys):
    first = holder(tmp_path)
    first.send_signal(signal.SIGKILL)
    first.wait()
    with RunLock(tmp_path) as lock:
        assert f"took over the lock of {tmp_path} from pid {first.pid}" in capsys.readouterr().err
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: the next one takes it silently
    with RunLock(tmp_path):
        assert "took over" not in capsys.readouterr().err
    assert lock._fd is None


def test_only_the_launching_process_takes_the_lock(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    assert is_launching_process()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert is_launching_process()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP launcher's child for rank 1
    assert not is_launching_process()
