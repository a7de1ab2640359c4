"""Integrity hashes in checkpoint files: a SHA-256 of every entry, written in and checked on load.

Every ``.ckpt`` the kit writes (:class:`~cheers_pl.io.checkpoint_io.CheersCheckpointIO`, the
consolidated FSDP file, the converted released checkpoint) carries ``checkpoint["integrity"] =
{"sha256": ..., "version": 1}``: the digest of every other entry, walked in order (dict keys and
values, list items, each tensor's dtype, shape and raw bytes, each other value's ``repr``). It
does not depend on how ``torch.save`` lays the file out, so a file that loads back to the same
values has the same digest, and one flipped bit in a tensor or a number changes it.

:func:`load_checked` reads a file with ``torch.load(weights_only=True)`` and refuses one whose
digest does not match (:class:`CheckpointCorruptError`, naming the file); a file that does not
even unzip or unpickle is refused the same way. A checkpoint written before the kit added hashes
loads with a warning. Hashing reads every byte once (about 1-2 GB/s on one core).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

KEY = "integrity"
VERSION = 1


class CheckpointCorruptError(ValueError):
    """A checkpoint file whose contents are not what was written (the message names the file)."""


def digest(checkpoint: dict) -> str:
    """SHA-256 (hex) of every entry of ``checkpoint`` but ``checkpoint["integrity"]``."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != KEY})
    return h.hexdigest()


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(x, dict):
        h.update(f"D{len(x)}|".encode())
        for k, v in x.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(x, (list, tuple)):
        h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}|".encode())
        for v in x:
            _feed(h, v)
    elif isinstance(x, (set, frozenset)):  # iteration order varies between processes
        h.update(f"S{len(x)}|".encode())
        for r in sorted(repr(v) for v in x):
            h.update(r.encode() + b"\0")
    elif isinstance(x, bytes):
        h.update(b"B%d|" % len(x) + x)
    else:
        h.update(f"V{type(x).__name__}:{x!r}\0".encode())


def seal(checkpoint: dict) -> dict:
    """A shallow copy of ``checkpoint`` with its integrity entry (the caller's dict is left alone)."""
    return {**checkpoint, KEY: {"sha256": digest(checkpoint), "version": VERSION}}


def check(checkpoint: Any, path: str | os.PathLike) -> Any:
    """Remove and verify ``checkpoint``'s integrity entry; raise :class:`CheckpointCorruptError`
    naming ``path`` on a mismatch, warn when there is none (a checkpoint from before hashes)."""
    if not isinstance(checkpoint, dict):
        return checkpoint
    stored = checkpoint.pop(KEY, None)
    if stored is None:
        warnings.warn(
            f"checkpoint {path} has no integrity hash (written before cheers-pl stored them): "
            "loaded without checking its contents",
            stacklevel=2,
        )
        return checkpoint
    expected = stored.get("sha256") if isinstance(stored, dict) else None
    actual = digest(checkpoint)
    if expected != actual:
        raise CheckpointCorruptError(
            f"checkpoint {path} is corrupt: its contents do not match the integrity hash written with "
            f"it (sha256 {str(expected)[:12]}... stored, {actual[:12]}... now), so it changed after it "
            "was written (a flipped bit, a cut copy); it is not loaded. Resume from another checkpoint "
            f"of {Path(path).parent} or copy this one again"
        )
    return checkpoint


def load_checked(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` then :func:`check`. A file that is not a readable
    torch checkpoint raises :class:`CheckpointCorruptError`; one holding objects that
    ``weights_only`` refuses raises ``pickle.UnpicklingError`` (torch's message)."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointCorruptError(
            f"checkpoint {path} cannot be read: it is damaged or not a torch checkpoint "
            f"({type(err).__name__}: {first})"
        ) from None
    return check(checkpoint, path)
