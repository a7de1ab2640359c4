"""Loading a previous stage's model weights (stage hand-off: weights only, no optimiser)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PREFIX = "model."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The CheersModel state dict in a Lightning checkpoint (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)} or state


def load_model_weights(
    model: nn.Module,
    path: str | Path,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> dict[str, list[str]]:
    """Load ``path``'s weights into ``model``, refusing any missing, unexpected or mis-shaped tensor.

    ``allow_missing`` / ``allow_unexpected`` are name prefixes an ablation legitimately adds or
    removes (a standard stage-I checkpoint starting a ``hfi: none`` run has gate weights the run
    lacks); those are left at their initialisation / ignored and returned, never silently.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(allow_missing or ("\0",)))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(allow_unexpected or ("\0",)))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(shapes)} of another shape "
            f"(e.g. {shapes[:3]}); was it trained with the same spec?"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"kept_initial": sorted(set(own) - set(state)), "ignored": sorted(set(state) - set(own))}
