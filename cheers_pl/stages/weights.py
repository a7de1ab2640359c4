"""Loading a previous stage's model weights (stage hand-off: weights only, no optimiser)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cheers_pl.io.integrity import CheckpointCorruptError, load_checked
from cheers_pl.io.sharded import is_sharded_checkpoint, read_sharded

PREFIX = "model."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The CheersModel state dict in a Lightning checkpoint (``torch.load(weights_only=True)``, its
    integrity hash checked: :func:`cheers_pl.io.integrity.load_checked`): a file, or the folder of
    a sharded (FSDP) checkpoint, gathered into one state in CPU memory."""
    return model_state(read_checkpoint(path))


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The CheersModel tensors of a checkpoint dict (``model.`` stripped), or a bare state as it is."""
    state = ckpt.get("state_dict", ckpt)
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)} or state


def read_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint dict of :func:`read_state_dict` (same checks and errors)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        ckpt = read_sharded(path)
    elif path.is_file():
        try:
            ckpt = load_checked(path)
        except CheckpointCorruptError:
            raise
        except Exception as err:  # a pickled object weights_only refuses, a corrupt or foreign file
            raise ValueError(
                f"{path} cannot be read as a checkpoint with weights_only=True ({type(err).__name__}: {err})"
            ) from None
    else:
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def check_fit(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    source: str | Path,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> None:
    """Raise ``ValueError`` naming the tensors unless ``state`` fits a model whose state is ``own``:
    no missing or unexpected name (outside the allowed prefixes), no tensor of another shape."""
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(allow_missing or ("\0",)))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(allow_unexpected or ("\0",)))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:5]]
        raise ValueError(
            f"{source} does not fit this model: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}, {len(shapes)} of another shape {shaped}; "
            "was it trained with the same spec?"
        )


def producing_target(init_from: str | Path, class_path: str | None = None) -> str:
    """The ``make`` target that writes ``init_from``: ``make stage1`` (``PRESET=tiny`` for a
    ``runs/tiny/...`` path), from the path's ``stageN`` folder or else the stage before ``class_path``'s."""
    from cheers_pl.stages import STAGES

    parts = Path(init_from).parts
    stage = next((p for p in reversed(parts) if re.fullmatch(r"stage[1-4]", p)), None)
    if stage is None and class_path:
        names = [cls.__name__ for cls in STAGES.values()]
        name = class_path.rpartition(".")[2]
        stage = f"stage{names.index(name)}" if name in names[1:] else None
    if stage is None:
        return ""
    tiny = stage in parts and parts.index(stage) >= 1 and parts[parts.index(stage) - 1] == "tiny"
    return f"make {stage}" + (" PRESET=tiny" if tiny else "")


def missing_init_from_message(init_from: str | Path, class_path: str | None = None) -> str:
    """One line for an ``init_from`` that does not exist: the file and what produces it."""
    target = producing_target(init_from, class_path)
    made = f"; it is written by `{target}` (the previous stage): run that first" if target else ""
    return (
        f"model.init_args.init_from: no checkpoint at {init_from}{made}, or point "
        "--model.init_args.init_from at another checkpoint (null: random initial weights)"
    )
