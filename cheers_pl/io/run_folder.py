"""Versioned run folders: each fresh ``cheers fit`` of a stage in its own folder, ``latest`` the last done.

With ``run_folder: versioned`` (the stage YAMLs set it) ``trainer.default_root_dir`` is the *stage
folder* ``S`` (``runs/paper/stage1``) and each fit writes into a run folder of its own::

    runs/paper/stage1/
        latest -> run-20261202-140531          # the last run that finished; the next stage's init_from
        run-20261202-140531/{checkpoints,tb}/  # logs, checkpoints, config.yaml
        run-20261202-151002/                   # a later run that failed: kept, latest not moved

* A fresh fit makes ``S/run-<time>`` (``run-slurm<JOB_ID>`` under SLURM, so that every node of a job
  and its requeues agree); a resume of a checkpoint inside ``S/run-*`` continues in that run's folder.
  Every path of the resolved config under ``S`` (the logger's ``save_dir``, ``ModelCheckpoint``'s
  ``dirpath``, ...) is moved under the run folder, so the saved ``config.yaml`` names it; rerunning a
  saved config from a run folder starts a new run beside it.
* ``latest`` moves only when a run finishes. When the new run reached fewer steps than the one
  ``latest`` named, the end-of-fit line says so (both runs stay).
* A fit that fails before its first optimiser step and saved no checkpoint leaves nothing behind: its
  run folder is removed. A later failure keeps the folder, marked ``failed`` in ``.cheers-run.json``.

``run_folder: fixed`` is Lightning's own behaviour (everything directly in ``default_root_dir``); the
in-process drivers (demo, sweep, paper tables) use it, as they give every run its own folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

MODES = ("versioned", "fixed")
MARKER = ".cheers-run.json"
LATEST = "latest"
RUN_DIR_ENV = "CHEERS_RUN_DIR"  # the launching process's choice, for the ranks a launcher starts
_RUN_NAME = re.compile(r"^run-[A-Za-z0-9_.-]+$")


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run folder (it holds the marker)."""
    return (Path(path) / MARKER).is_file()


def stage_folder(root: str | os.PathLike) -> Path:
    """The stage folder of ``root``: its parent when ``root`` is itself a run folder (a saved config)."""
    root = Path(os.path.normpath(root))
    return root.parent if is_run_folder(root) else root


def run_folders(stage: str | os.PathLike) -> list[Path]:
    """The run folders of a stage folder, oldest name first."""
    stage = Path(stage)
    if not stage.is_dir():
        return []
    return sorted(p for p in stage.iterdir() if p.is_dir() and _RUN_NAME.match(p.name) and not p.is_symlink())


def read_marker(run: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads((Path(run) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def write_marker(run: Path, **fields: Any) -> None:
    """Update the run's ``.cheers-run.json`` (atomically: a temporary file renamed over it)."""
    record = {**read_marker(run), **fields}
    tmp = run / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, run / MARKER)


def _new_name(stage: Path) -> str:
    job = os.environ.get("SLURM_JOB_ID")
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    job = f"slurm{job}" if job else elastic if elastic and elastic != "none" else None
    base = f"run-{job}" if job else "run-" + time.strftime("%Y%m%d-%H%M%S")
    name, k = base, 1
    while (stage / name).exists() and not job:
        k += 1
        name = f"{base}-{k}"
    return name


def shared_run_id() -> str | None:
    """The run id every rank of an externally launched job sees alike, or ``None``: ``CHEERS_RUN_DIR``
    (set by a launching process for the ranks it starts), ``SLURM_JOB_ID``, torchrun's ``--rdzv-id``."""
    for key in (RUN_DIR_ENV, "SLURM_JOB_ID"):
        if os.environ.get(key):
            return os.environ[key]
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    return elastic if elastic and elastic != "none" else None


def needs_shared_id() -> bool:
    """Several processes launched from outside (torchrun, srun) and no id they share: a versioned
    run folder cannot be agreed on, so the run writes into the stage folder itself."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and shared_run_id() is None


def choose_run_folder(root: str | os.PathLike, ckpt_path: str | None) -> tuple[Path, Path, bool, str]:
    """``(stage, run, resumed, note)`` for a fit with ``default_root_dir = root``: the run folder of
    the resumed checkpoint when it lies in a run folder of the stage, else a new one. The ranks a
    launcher starts read the launching process's choice from ``CHEERS_RUN_DIR``."""
    stage = stage_folder(root)
    given = os.environ.get(RUN_DIR_ENV)
    if given:
        return stage, Path(given), False, f"run folder {given}"
    if ckpt_path:
        ckpt = Path(os.path.realpath(ckpt_path))
        for run in run_folders(stage):
            if Path(os.path.realpath(run)) in ckpt.parents:
                return stage, run, True, f"resuming in run folder {run}"
    run = stage / _new_name(stage)
    note = f"new run folder {run} (earlier runs stay beside it; {stage / LATEST} names the last finished one)"
    return stage, run, False, note


def start(stage: Path, run: Path, resumed: bool = False) -> None:
    """Create the run folder and its marker (status ``running``); ranks started later find it by
    ``CHEERS_RUN_DIR`` (:func:`end` drops it again)."""
    run.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {"stage_folder": str(stage), "status": "running", "resumed": resumed}
    if not read_marker(run).get("started"):
        fields["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_marker(run, **fields)
    os.environ[RUN_DIR_ENV] = str(run)


def end() -> None:
    """Forget this process's run folder (a later fit in the same process chooses its own)."""
    os.environ.pop(RUN_DIR_ENV, None)


def move_paths(cfg: Any, old: Path, new: Path, skip: tuple[str, ...] = ("ckpt_path",)) -> list[str]:
    """Rewrite, in place, every string of ``cfg`` (nested dicts / lists / jsonargparse Namespaces)
    whose normalised path is ``old`` or lies under it, to the same place under ``new``. Paths into
    another run folder or through ``latest`` are left alone, and so are the keys in ``skip``.
    Returns the dotted keys changed."""
    old_s = os.path.normpath(old)
    changed: list[str] = []

    def moved(value: str) -> str | None:
        if not value or "://" in value:
            return None
        norm = os.path.normpath(value)
        if norm == old_s:
            return str(new)
        if not norm.startswith(old_s + os.sep):
            return None
        rest = norm[len(old_s) + 1 :]
        head = rest.split(os.sep, 1)[0]
        if head == LATEST or _RUN_NAME.match(head):
            return None
        return str(new / rest)

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, str):
            out = moved(node)
            if out is not None:
                changed.append(key)
                return out
            return node
        if isinstance(node, list):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, dict):
            items = list(node.items())
        else:
            items = list(vars(node).items()) if hasattr(node, "__dict__") else []
        for k, v in items:
            if k in skip or k.startswith("__"):
                continue
            new_v = walk(v, f"{key}.{k}" if key else k)
            if new_v is not v:
                if isinstance(node, dict):
                    node[k] = new_v
                else:
                    setattr(node, k, new_v)
        return node

    walk(cfg, "")
    return changed


def _step(run: Path | None) -> int | None:
    return None if run is None else read_marker(run).get("global_step")


def finish(stage: Path, run: Path, global_step: int) -> str:
    """Mark ``run`` finished at ``global_step`` and point ``stage/latest`` at it; the line to print."""
    ended = time.strftime("%Y-%m-%d %H:%M:%S")
    write_marker(run, status="finished", global_step=int(global_step), ended=ended)
    link = stage / LATEST
    before = Path(os.path.realpath(link)) if link.is_symlink() else None
    tmp = stage / f".{LATEST}.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run.name if run.parent == stage else os.path.abspath(run))
    os.replace(tmp, link)  # atomic: readers see the old link or the new one
    line = f"run folder {run} finished at step {global_step}; {link} -> {run.name}"
    old_step = _step(before)
    if before is not None and before != Path(os.path.realpath(run)) and old_step is not None:
        if old_step > global_step:
            line += (
                f" (the previous latest, {before.name}, reached step {old_step}, more than this run: "
                f"it is kept; point the next stage at it with --model.init_args.init_from "
                f"{before / 'checkpoints' / 'last.ckpt'})"
            )
        else:
            line += f" (was {before.name}, step {old_step})"
    return line


def has_checkpoint(run: Path) -> bool:
    """Whether ``run`` holds a checkpoint (a ``.ckpt`` file, or a sharded ``.ckpt`` folder)."""
    return run.is_dir() and any(run.rglob("*.ckpt"))


def fail(run: Path, global_step: int, error: BaseException) -> str:
    """After a failed fit: remove ``run`` when it took no step and holds no checkpoint (and was not a
    resumed run), else mark it failed; the line to print. ``latest`` is not moved."""
    if global_step == 0 and not has_checkpoint(run) and not read_marker(run).get("resumed"):
        shutil.rmtree(run, ignore_errors=True)
        return f"the fit failed before its first step; removed its empty run folder {run}"
    write_marker(
        run,
        status="failed",
        global_step=int(global_step),
        error=f"{type(error).__name__}: {error}"[:500],
        ended=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    return f"run folder {run} kept at step {global_step}, marked failed; latest is not moved"
