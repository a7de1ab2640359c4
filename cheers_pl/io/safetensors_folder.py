"""Folders of safetensors shards (a released Cheers checkpoint, a component release): read and write.

FOLDER/config.json
FOLDER/model-0000i-of-0000N.safetensors      (or one model.safetensors)
FOLDER/model.safetensors.index.json          {"metadata": {"total_size"}, "weight_map": {name: file}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_safetensors_folder(folder: str | Path) -> dict[str, Tensor]:
    """Every tensor of a folder's ``*.safetensors`` shards (through the index json when there is one)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / INDEX_FILE
    weight_map = None
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    state: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{index} names the shard {path.name}, which is not in {folder}")
        for name, tensor in load_file(str(path)).items():
            if name in state:
                raise ValueError(f"{folder}: tensor {name!r} is in more than one shard")
            state[name] = tensor
    if weight_map is not None and set(weight_map) != set(state):
        lost, extra = sorted(set(weight_map) - set(state)), sorted(set(state) - set(weight_map))
        raise ValueError(
            f"{index} disagrees with the shards: listed but absent {lost[:5]}, unlisted {extra[:5]}"
        )
    return state


def unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, cloning any that shares storage with an earlier one (safetensors refuses ties)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        t = tensor.contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            t = t.clone() if ptr in seen else t
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_safetensors_folder(
    state: Mapping[str, Tensor],
    folder: str | Path,
    config: Mapping[str, Any],
    num_shards: int = 1,
    weight_map: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state`` as safetensors shards + index json + ``config.json``; returns the folder.

    ``num_shards`` consecutive shards of about equal tensor counts, or ``weight_map`` (name ->
    file name, e.g. a release's own index) to put each tensor in the file it came from.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = unshared(state)
    if weight_map is None:
        names = list(state)
        per = -(-len(names) // max(num_shards, 1))
        weight_map = {}
        for i in range(num_shards):
            file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" if num_shards > 1 else SINGLE_FILE
            weight_map.update(dict.fromkeys(names[i * per : (i + 1) * per], file))
    elif set(weight_map) != set(state):
        lost, extra = sorted(set(weight_map) - set(state)), sorted(set(state) - set(weight_map))
        raise ValueError(
            f"weight_map disagrees with the state: no tensor for {lost[:5]}, unlisted {extra[:5]}"
        )
    files: dict[str, dict[str, Tensor]] = {}
    for name, file in weight_map.items():
        files.setdefault(file, {})[name] = state[name]
    for file, tensors in files.items():
        save_file(tensors, str(folder / file), {"format": "pt"})
    if len(files) > 1 or next(iter(files), SINGLE_FILE) != SINGLE_FILE:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(weight_map)}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
