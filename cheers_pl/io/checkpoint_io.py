"""``CheersCheckpointIO``: training checkpoints written atomically and read without pickle code.

Writing: the checkpoint goes to a hidden ``.{name}.partial-{pid}`` file beside its target,
is flushed and fsynced, then renamed over the target (``os.replace``, atomic on one file
system) and the folder fsynced. A process killed at any point leaves either the previous
complete file or the new complete file under the name, never a partial one, so ``last.ckpt``
always holds a whole checkpoint; a leftover partial file is not a ``.ckpt`` (Lightning's
``ckpt_path="last"`` never picks it) and is removed by the next write of that name, unless the
pid in its name is a live process (another writer's file: never removed). A write that runs out
of disk space (ENOSPC, EDQUOT) removes its partial file and raises :class:`DiskFullError`, one
line naming the folder and saying that the previous file under the name is untouched.

Every file carries an integrity hash of its contents (:mod:`cheers_pl.io.integrity`), checked on
load: a flipped bit is refused naming the file; a checkpoint from before hashes loads with a
warning.

Reading: ``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers
only, so a checkpoint cannot run code when it is resumed. Every experiment YAML sets it as
the trainer's plugin::

    trainer:
      plugins: [{class_path: cheers_pl.io.checkpoint_io.CheersCheckpointIO}]
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cheers_pl.io.integrity import load_checked, seal
from cheers_pl.io.run_lock import pid_alive

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A checkpoint write that ran out of disk space; the message names the folder."""


class CheersCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced checkpoint files; loads with ``weights_only=True`` (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        sealed = seal(checkpoint)
        try:
            with open(partial, "wb") as f:
                torch.save(sealed, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if _out_of_space(err):
                raise DiskFullError(_disk_full_message(target)) from None
            raise
        finally:
            partial.unlink(missing_ok=True)
        _fsync_folder(target.parent)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ):
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        try:
            return load_checked(path, map_location=map_location or "cpu")
        except pickle.UnpicklingError as err:
            raise RuntimeError(
                f"checkpoint {path} holds objects other than tensors and plain containers; it is not "
                f"loaded (weights_only=True): {str(err).splitlines()[0]}"
            ) from None


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove ``.{name}.partial-{pid}`` files beside ``target`` whose writer is dead; return them.
    A live writer's (another process of this machine still writing it) is never touched."""
    removed = []
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it was raised from / during is ENOSPC or EDQUOT (torch.save
    raises its own ``RuntimeError`` with the ``OSError`` as its context)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        err = err.__cause__ or err.__context__
    return False


def _disk_full_message(target: Path) -> str:
    previous = (
        f"the previous {target.name} there is intact ({target.stat().st_size} bytes, not replaced)"
        if target.is_file()
        else f"there was no earlier {target.name} to keep"
    )
    last = target.with_name("last.ckpt")
    if target.name != last.name and last.is_file():
        previous += f"; {last.name} there is intact"
    return (
        f"no space left on the device of {target.parent} while writing {target.name}; the partial "
        f"file was removed and {previous}. Free space, then resume with --ckpt_path last"
    )


def _fsync_folder(folder: Path) -> None:
    """Persist a rename (the folder entry) where the platform allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
