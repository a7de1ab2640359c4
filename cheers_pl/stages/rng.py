"""Random-number states of every rank, saved in checkpoints so that a resumed run draws the same.

What a training step draws from the global generators: the flow times t and the noise z0 of
every image (``CheersModel.forward`` without an explicit generator), on the CPU generator or
the accelerator's. The data pipeline draws from its own generators, whose states live in the
data position (``CheersDataModule.state_dict``), so data-loader workers need nothing here.

Lightning writes a checkpoint from rank 0 only, so each rank's states are gathered into it;
on resume every rank takes its own entry (a different world size is refused). The states are
applied just before the first training batch after the restore: anything Lightning draws in
between (building the data-loader iterator draws a base seed) then cannot shift them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def capture() -> dict[str, Any]:
    """This process's generator states: torch CPU, every CUDA device, numpy, Python ``random``."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set this process's generators to :func:`capture`'s ``state``."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def gather() -> dict[str, Any]:
    """Every rank's :func:`capture` (a collective when distributed): {"world_size", "ranks"}."""
    mine = capture()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        return {"world_size": len(ranks), "ranks": ranks}
    return {"world_size": 1, "ranks": [mine]}


def this_rank(saved: dict[str, Any]) -> dict[str, Any]:
    """This rank's entry of :func:`gather`'s ``saved``; raises if the world size differs."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if saved.get("world_size") != world:
        raise RuntimeError(
            f"the random states were saved with {saved.get('world_size')} ranks; this run has {world}"
        )
    return saved["ranks"][rank]


def _numpy_state() -> tuple:
    # plain types (no numpy arrays) so that the checkpoint loads with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))


def _python_state() -> tuple:
    version, internal, gauss = random.getstate()
    return (version, list(internal), gauss)
