"""``CheersCheckpointIO``: training checkpoints written atomically and read without pickle code.

Writing: the checkpoint goes to a hidden ``.{name}.partial-{pid}`` file beside its target,
is flushed and fsynced, then renamed over the target (``os.replace``, atomic on one file
system) and the folder fsynced. A process killed at any point leaves either the previous
complete file or the new complete file under the name, never a partial one, so ``last.ckpt``
always holds a whole checkpoint; a leftover partial file is not a ``.ckpt`` (Lightning's
``ckpt_path="last"`` never picks it) and is removed by the next write of that name.

Reading: ``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers
only, so a checkpoint cannot run code when it is resumed. Every experiment YAML sets it as
the trainer's plugin::

    trainer:
      plugins: [{class_path: cheers_pl.io.checkpoint_io.CheersCheckpointIO}]
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheersCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced checkpoint files; loads with ``weights_only=True`` (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            stale.unlink(missing_ok=True)  # left by a writer that was killed
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        _fsync_folder(target.parent)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ):
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise RuntimeError(
                f"checkpoint {path} holds objects other than tensors and plain containers; it is not "
                f"loaded (weights_only=True): {str(err).splitlines()[0]}"
            ) from None


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
