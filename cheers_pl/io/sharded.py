"""Sharded (FSDP ``state_dict_type: sharded``) checkpoints: recognise them and make one file of them.

A sharded checkpoint is a folder: ``torch.distributed.checkpoint`` files (``.metadata`` and one
``__<rank>_0.distcp`` per rank) holding the model and optimiser states, plus Lightning's
``meta.pt`` (everything else: loops, callbacks, hyperparameters with the spec). Lightning resumes
from the folder itself (``ckpt_path=``, any world size); :func:`consolidate` writes the single-file
``.ckpt`` a one-process Trainer or the kit's loaders (``cheers_pl.io.export.load_any``,
``init_from``) read::

    python -m cheers_pl.io.sharded runs/paper/stage2/checkpoints/last.ckpt --out stage2.ckpt

(the same file as ``python -m lightning.pytorch.utilities.consolidate_checkpoint FOLDER
--output_file FILE``). The whole checkpoint is gathered in CPU memory.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from cheers_pl.io.integrity import seal

META = "meta.pt"  # Lightning's file beside the shards (lightning.fabric.utilities.load._METADATA_FILENAME)
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a Lightning sharded checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / META).is_file() and (path / DCP_METADATA).is_file()


def read_sharded(path: str | Path) -> dict[str, Any]:
    """The sharded checkpoint at ``path`` as one checkpoint dict, in the layout of a single-file one.

    ``state_dict`` holds the full (unsharded) module state (``model.*`` names of the
    LightningModule), ``optimizer_states`` the full optimiser states (keyed by parameter name, as
    FSDP writes them), and the rest comes from ``meta.pt`` (``global_step``, ``loops``,
    ``hyper_parameters``, ...). Raises ``FileNotFoundError`` / ``ValueError`` naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no sharded checkpoint at {path}")
    if not is_sharded_checkpoint(path):
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else "a file"
        raise ValueError(
            f"{path} is not a sharded checkpoint folder ({DCP_METADATA} and {META} expected, found {found})"
        )
    checkpoint = _load_weights_only(path)  # shards + meta.pt, as Lightning's consolidation
    checkpoint["state_dict"] = checkpoint.pop("model")
    keys = sorted((k for k in checkpoint if re.fullmatch(r"optimizer_[0-9]+", k)), key=lambda k: int(k[10:]))
    if keys:
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in keys]
    return checkpoint


def _load_weights_only(path: Path) -> dict[str, Any]:
    """Lightning's ``_load_distributed_checkpoint``, but safe: DCP's planner reads every non-tensor
    entry with ``torch.load(weights_only=False)``, so a shard could run code; here they, and
    ``meta.pt``, are read with ``weights_only=True`` (a refused object raises ``ValueError``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class WeightsOnlyPlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as err:
                raise ValueError(
                    f"{path}: entry {fqn!r} cannot be read with weights_only=True "
                    f"({type(err).__name__}: {err})"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    checkpoint: dict[str, Any] = {}
    try:
        _load_state_dict(
            checkpoint, storage_reader=FileSystemReader(path), planner=WeightsOnlyPlanner(), no_dist=True
        )
    except CheckpointException as err:  # a BaseException holding each rank's error
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, ValueError)]
        if refused:
            raise refused[0] from None
        raise
    checkpoint.update(torch.load(path / META, map_location="cpu", weights_only=True))
    return checkpoint


def consolidate(src_dir: str | Path, dst_file: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the sharded checkpoint ``src_dir`` as one ``.ckpt`` file and return its path.

    ``dst_file`` defaults to ``<src_dir>.consolidated`` beside the folder (Lightning's default).
    The file carries an integrity hash (:mod:`cheers_pl.io.integrity`) and loads with
    ``torch.load(weights_only=True)``, in a one-process Trainer
    (``ckpt_path=``; optimiser states included) and in the kit's loaders. An existing
    ``dst_file`` is refused unless ``overwrite``.
    """
    src = Path(src_dir)
    dst = Path(dst_file) if dst_file is not None else src.with_name(src.name + ".consolidated")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) or choose another path")
    checkpoint = read_sharded(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(seal(checkpoint), tmp)  # with its integrity hash, checked by the kit's loaders
    tmp.replace(dst)  # no half-written checkpoint under the final name
    return dst


def main(argv: list[str] | None = None) -> int:
    """``python -m cheers_pl.io.sharded FOLDER [--out FILE] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cheers_pl.io.sharded",
        description="Consolidate a sharded (FSDP) checkpoint folder into one .ckpt file.",
    )
    parser.add_argument("folder", help="the sharded checkpoint folder (holds .metadata and meta.pt)")
    parser.add_argument("--out", default=None, help="the file to write (default: FOLDER.consolidated)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        print(consolidate(args.folder, args.out, overwrite=args.overwrite))
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # one line naming the path
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
