"""What ``--ckpt_path`` resumes, checked against the config before anything is built.

* ``last`` is resolved here to the newest ``last*.ckpt`` of the config's ``ModelCheckpoint``
  folders (Lightning's rule); none there is an error naming the folders searched, since a
  "resume" that silently starts from scratch redoes a run. ``auto`` resumes the same file when
  there is one and starts fresh otherwise, saying which (:func:`resolve_ckpt_path`).
* The checkpoint must be of the config's stage, spec and data tasks (:func:`disagreements`):
  LightningCLI would otherwise merge the checkpoint's hyperparameters, class path included,
  into the config, and run another stage than the YAML names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from cheers_pl.io.integrity import load_checked
from cheers_pl.io.sharded import META, is_sharded_checkpoint

LAST = re.compile(r"^last(-\d+)?$")
ROMAN = ("I", "II", "III", "IV")


def _get(ns: Any, key: str, default: Any = None) -> Any:
    if ns is None:
        return default
    return ns.get(key, default) if hasattr(ns, "get") else getattr(ns, key, default)


def _plain(x: Any) -> Any:
    """A jsonargparse Namespace (or a dataclass dict) as plain dicts."""
    return _plain(x.as_dict()) if hasattr(x, "as_dict") else x


def checkpoint_folders(trainer_cfg: Any) -> list[Path]:
    """The ``dirpath`` of each ``ModelCheckpoint`` in ``trainer.callbacks`` (``default_root_dir
    /checkpoints`` for one without a dirpath, or when there is none)."""
    root = Path(_get(trainer_cfg, "default_root_dir") or os.getcwd())
    folders = []
    for cb in _get(trainer_cfg, "callbacks") or []:
        if str(_get(cb, "class_path", "")).endswith("ModelCheckpoint"):
            dirpath = _get(_get(cb, "init_args"), "dirpath")
            folders.append(Path(dirpath) if dirpath else root / "checkpoints")
    return list(dict.fromkeys(folders)) or [root / "checkpoints"]


def find_last(folders: list[Path]) -> Path | None:
    """The newest ``last.ckpt`` / ``last-N.ckpt`` (a file or a sharded folder) in ``folders``."""
    found = [
        p
        for folder in folders
        if folder.is_dir()
        for p in folder.iterdir()
        if p.suffix == ".ckpt" and LAST.match(p.stem) and (p.is_file() or is_sharded_checkpoint(p))
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def versioned_folders(folders: list[Path], root: Path) -> list[Path]:
    """``folders`` and, for each one under the stage folder of ``root``, the same place in every
    run folder of it (:mod:`cheers_pl.io.run_folder`), newest run first."""
    from cheers_pl.io.run_folder import run_folders, stage_folder

    stage = stage_folder(root)
    out = []
    for folder in folders:
        try:
            rel = Path(os.path.normpath(folder)).relative_to(Path(os.path.normpath(root)))
        except ValueError:
            out.append(folder)
            continue
        out += [run / rel for run in reversed(run_folders(stage))] + [stage / rel]
    return list(dict.fromkeys(out))


def resolve_ckpt_path(
    ckpt_path: str | None, trainer_cfg: Any, versioned: bool = False
) -> tuple[str | None, str | None]:
    """``(path, note)``: ``last`` / ``auto`` made a real path (``auto`` with none: ``None``, start
    fresh); ``note`` says what was chosen. Raises ``FileNotFoundError`` for ``last`` with none.
    ``versioned``: the run folders of the stage are searched too (the newest ``last.ckpt`` wins)."""
    if ckpt_path not in ("last", "auto"):
        return ckpt_path, None
    folders = checkpoint_folders(trainer_cfg)
    if versioned:
        folders = versioned_folders(folders, Path(_get(trainer_cfg, "default_root_dir") or os.getcwd()))
    last = find_last(folders)
    searched = ", ".join(str(f) for f in folders)
    if last is not None:
        return str(last), f"--ckpt_path {ckpt_path}: resuming from {last}"
    if ckpt_path == "auto":
        return None, f"--ckpt_path auto: no last.ckpt in {searched}; starting a fresh run"
    raise FileNotFoundError(
        f"--ckpt_path last: no last.ckpt in {searched} (the ModelCheckpoint folder), so there is nothing "
        "to resume; to start fresh drop --ckpt_path, or pass --ckpt_path auto (resume when there is one)"
    )


def read_resume_info(path: str | Path) -> dict[str, Any]:
    """``{"hparams": ..., "tasks": [...] | None}`` of the checkpoint at ``path`` (a file, checked
    against its integrity hash, or a sharded folder's ``meta.pt``)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        ckpt = torch.load(path / META, map_location="cpu", weights_only=True)
    else:
        ckpt = load_checked(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds {type(ckpt).__name__}, not a checkpoint dict")
    return {"hparams": dict(ckpt.get("hyper_parameters") or {}), "tasks": data_tasks(ckpt)}


def data_tasks(ckpt: dict) -> list[str] | None:
    """The task names in the checkpoint's data position (each worker's ``streams``), or None."""
    names: dict[str, None] = {}

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("streams"), dict):
                names.update(dict.fromkeys(x["streams"]))
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(ckpt.get("CheersDataModule"))
    return list(names) if names else None


def stage_label(class_path: str | None) -> str:
    """``"stage II (PretrainStage)"`` for a stage's class path."""
    from cheers_pl.stages import STAGES

    name = str(class_path).rpartition(".")[2]
    for k, cls in enumerate(STAGES.values()):
        if cls.__name__ == name:
            return f"stage {ROMAN[k]} ({name})"
    return f"{name}"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def spec_differences(saved: Any, config: Any) -> list[str]:
    """``spec.<key>=<saved> vs <config>`` for each spec field both name with different values
    (component ``path`` fields aside: where pretrained weights come from, not what the model is)."""
    a, b = _flat(_plain(saved) or {}, "spec"), _flat(_plain(config) or {}, "spec")
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return [
        f"{k}={a[k]!r} in the checkpoint vs {b[k]!r} in the config"
        for k in a
        if k in b and not k.endswith(".path") and norm(a[k]) != norm(b[k])
    ]


def disagreements(info: dict[str, Any], model_cfg: Any, data_cfg: Any) -> list[str]:
    """How the checkpoint (``read_resume_info``) differs from the config's stage, spec and tasks."""
    out = []
    hp = info["hparams"]
    saved_class, config_class = hp.get("_class_path"), _get(model_cfg, "class_path")
    if saved_class and config_class and saved_class != config_class:
        out.append(f"it is {stage_label(saved_class)} but the config is {stage_label(config_class)}")
    if "spec" in hp:
        diffs = spec_differences(hp["spec"], _get(_get(model_cfg, "init_args"), "spec"))
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            out.append("its spec differs: " + "; ".join(diffs[:3]) + more)
    tasks = _plain(_get(data_cfg, "tasks")) or {}
    extra = [t for t in info["tasks"] or [] if t not in tasks]
    if extra and tasks:
        out.append(
            f"its data position streams task(s) {extra} that the config's data.tasks {sorted(tasks)} lacks"
        )
    return out


def mismatch_message(path: str, found: list[str]) -> str:
    """One line: what disagrees and the two ways on."""
    return (
        f"--ckpt_path {path}: the checkpoint does not match the config: {'; '.join(found)}. To start "
        f"this config from its weights pass --model.init_args.init_from {path} instead of --ckpt_path; "
        "to resume it under the config's stage, spec and data anyway pass --allow_stage_switch true"
    )
