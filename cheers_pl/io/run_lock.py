"""One ``cheers fit`` per run folder: a lock file in ``trainer.default_root_dir``.

``{folder}/.cheers-fit.lock`` is held with ``flock`` (exclusive, non-blocking) for the whole fit
and holds the holder's pid, host and start time. A second fit in the folder is refused naming
that pid (:class:`RunFolderBusy`). The operating system drops the lock when its process ends,
however it ends (SIGKILL included), so a lock left by a dead run is simply taken over, with a
line that says whose it was. Only the launching process takes it: processes that a DDP launcher
starts for the other ranks (``LOCAL_RANK``, ``NODE_RANK``, ``RANK`` set and non-zero) do not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".cheers-fit.lock"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class RunFolderBusy(RuntimeError):
    """Another live ``cheers fit`` holds the run folder's lock."""


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_launching_process() -> bool:
    """Whether this process is rank 0 of its run (or not a distributed child at all)."""
    return all(os.environ.get(k, "0") in ("0", "") for k in _RANK_VARIABLES)


class RunLock:
    """The lock of one run folder; :meth:`acquire` / :meth:`release` (or a ``with`` block)."""

    def __init__(self, folder: str | os.PathLike, command: str = "cheers fit"):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunFolderBusy` naming the holder's pid."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "")
            since = f", started {holder['started']}" if holder.get("started") else ""
            raise RunFolderBusy(
                f"run folder {self.folder} is in use by another {holder.get('command', 'cheers fit')} "
                f"({who}{since}; lock {self.path}); wait for it to end, or give this run another "
                "--trainer.default_root_dir"
            ) from None
        previous = _read(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            print(
                f"{self.command}: took over the lock of {self.folder} from pid {previous['pid']}"
                f"{' (started ' + previous['started'] + ')' if previous.get('started') else ''}, "
                "which ended without releasing it",
                file=sys.stderr,
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and drop the lock (the file stays: removing it would race)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
