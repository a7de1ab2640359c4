"""``MixtureDataset``: task streams mixed by ratio, per sample or per whole batch, yielding batches.

``mode="sample"`` draws each sample's task with probability proportional to its ratio (stages
II/III: understanding : generation : text = 3 : 6 : 1); ``mode="batch"`` draws one task per
batch (stage IV: understanding : generation batches 1 : 1). Batches are assembled in the worker,
so the state after each batch (every task stream's position, the mixing generator, the skip
counters) is what torchdata's ``StatefulDataLoader`` saves.

A sample that fails (bad JSON, corrupt image, too long, fields of the wrong type, an image
header claiming a decompression bomb, ...) is skipped and counted by task and reason (see
:func:`decode_sample`); the first few per reason are logged with their shard and key. A task
whose stream has nothing readable left (:class:`~cheers_pl.data.stream.EmptyStreamError`: every
shard of this worker's share gone or unreadable for two epochs) is dropped from this worker's
mixture with a warning naming it, and the ratios of the tasks left are renormalised; when no
task is left, :class:`NoDataError` says what happened to every task's shards. Both are in the
state, so a resumed run drops the same tasks.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from cheers_pl.data.schema import TASKS, SampleError, from_raw
from cheers_pl.data.stream import EmptyStreamError, Slot, TaskStream, stable_seed
from cheers_pl.data.transforms import SampleEncoder, collate

log = logging.getLogger(__name__)
MIXTURE_MODES = ("sample", "batch")
LOGGED_PER_REASON = 5
# What malformed records make the schema, image and tokenising code raise besides SampleError
# (a field of the wrong type, nesting deep enough to exhaust the JSON parser, ...).
MALFORMED = (TypeError, ValueError, KeyError, AttributeError, IndexError, OSError, RecursionError)


class NoDataError(RuntimeError):
    """Every task of a mixture was dropped: none of them has a readable sample left."""


def decode_sample(encoder: SampleEncoder, raw: dict, generator: torch.Generator | None = None) -> dict:
    """``encoder(from_raw(raw))``, with every way a sample's bytes can be bad raised as
    :class:`SampleError`: ``image_too_large`` (PIL's decompression-bomb limit) and ``malformed``
    (:data:`MALFORMED`, e.g. ``images`` that is a number) besides the schema's own reasons."""
    try:
        return encoder(from_raw(raw), generator)
    except SampleError:
        raise
    except Image.DecompressionBombError as err:
        raise SampleError("image_too_large", str(err)) from None
    except MALFORMED as err:
        raise SampleError("malformed", f"{type(err).__name__}: {err}") from None


@dataclass
class TaskSource:
    """One task of a mixture: its shard URLs and its mixing ratio."""

    shards: list[str]
    ratio: float = 1.0


def check_mixture(tasks: Mapping[str, TaskSource | Mapping[str, Any]], mode: str) -> None:
    """Raise ``ValueError`` naming the key (and the valid choices) for a bad mixture.

    ``tasks`` may hold :class:`TaskSource` objects or the plain dicts of a YAML ``data.tasks``
    (checked before they become TaskSources): task names from the sample schema, keys
    ``shards`` (a list of shard specs) and ``ratio`` (a number >= 0), not all ratios zero, and no
    positive ratio for a task without shards.
    """
    if mode not in MIXTURE_MODES:
        raise ValueError(f"mixture={mode!r} is not valid; valid choices are {list(MIXTURE_MODES)}")
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks: at least one task is needed, e.g. {generation: {shards: [...], ratio: 1}}")
    valid_keys = [f.name for f in fields(TaskSource)]
    ratios = {}
    for name, src in tasks.items():
        if name not in TASKS:
            raise ValueError(f"tasks.{name}: unknown task {name!r}; valid tasks are {list(TASKS)}")
        if isinstance(src, TaskSource):
            shards, ratio = src.shards, src.ratio
        elif isinstance(src, Mapping):
            unknown = sorted(set(src) - set(valid_keys))
            if unknown:
                raise ValueError(f"tasks.{name}: unknown key(s) {unknown}; valid keys are {valid_keys}")
            if "shards" not in src:
                raise ValueError(f"tasks.{name}.shards is missing: list the task's shard specs")
            shards, ratio = src["shards"], src.get("ratio", 1.0)
        else:
            raise ValueError(f"tasks.{name}={src!r} must be a mapping with keys {valid_keys}")
        if not isinstance(shards, (list, tuple)) or not all(isinstance(s, str) for s in shards):
            raise ValueError(
                f"tasks.{name}.shards={shards!r} must be a list of shard specs (paths, folders, URLs), "
                "e.g. [generation/]"
            )
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise ValueError(f"tasks.{name}.ratio={ratio!r} must be a finite number >= 0")
        if ratio < 0:
            raise ValueError(f"tasks.{name}.ratio={ratio} is negative; ratios must be >= 0")
        if ratio > 0 and not shards:
            raise ValueError(
                f"tasks.{name}.shards is empty but its ratio is {ratio}: give it shards or ratio 0"
            )
        ratios[name] = ratio
    if sum(ratios.values()) <= 0:
        raise ValueError(f"tasks: all ratios are zero ({ratios}); at least one task needs a ratio > 0")


def current_slot() -> Slot:
    """This process's rank and this worker's index (torch.distributed and DataLoader workers)."""
    rank, world = (
        (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    )
    info = get_worker_info()
    return Slot(rank, world, info.id if info else 0, info.num_workers if info else 1)


class MixtureDataset(IterableDataset):
    """Endless mixed batches (dicts in the model's batch format) for this rank and worker."""

    def __init__(
        self,
        tasks: dict[str, TaskSource],
        encoder: SampleEncoder,
        batch_size: int,
        mode: str = "sample",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_consecutive_skips: int = 1000,
    ):
        check_mixture(tasks, mode)
        self.tasks = {n: s for n, s in tasks.items() if s.ratio > 0}
        self.encoder, self.batch_size, self.mode, self.seed = encoder, batch_size, mode, seed
        self.shuffle_buffer, self.max_consecutive_skips = shuffle_buffer, max_consecutive_skips
        self._state: dict | None = None
        self._live: _Live | None = None

    def _start(self) -> _Live:
        slot = current_slot()
        live = _Live(
            {n: TaskStream(n, s.shards, slot, self.seed, self.shuffle_buffer) for n, s in self.tasks.items()},
            torch.Generator().manual_seed(stable_seed(self.seed, "mixture", slot.index)),
            slot,
        )
        if self._state is not None:
            if self._state["slot"] != [slot.rank, slot.world, slot.worker, slot.num_workers]:
                raise RuntimeError(f"data state was saved for slot {self._state['slot']}, this is {slot}")
            for name, stream in live.streams.items():
                stream.load_state_dict(self._state["streams"][name])
            live.generator.set_state(self._state["generator"])
            live.skipped.update(self._state["skipped"])
            live.dropped.update(self._state.get("dropped", {}))
            self.encoder.repaired.update(self._state.get("repaired", {}))
            live.encode_generator.set_state(self._state["encode_generator"])
            self._state = None
        return live

    def __iter__(self):
        live = self._live = self._start()
        iters = {name: iter(stream) for name, stream in live.streams.items()}
        while True:
            task = self._draw(live) if self.mode == "batch" else None
            samples: list[dict] = []
            while len(samples) < self.batch_size:
                pick = task or self._draw(live)
                try:
                    samples.append(self._next(live, iters, pick))
                except EmptyStreamError as err:
                    self._drop(live, pick, err)
                    if task is not None:  # one task per batch: start the batch again with another
                        if samples:
                            live.skipped[f"{pick}/task_dropped"] += len(samples)
                        task, samples = self._draw(live), []
            yield collate(self.encoder.processor, samples)

    def _draw(self, live: _Live) -> str:
        if live.weights is None:
            names = [n for n in self.tasks if n not in live.dropped]
            if not names:
                raise NoDataError(
                    f"no task of the mixture has a readable sample left (slot {live.slot}): "
                    + " | ".join(f"{n}: {msg}" for n, msg in live.dropped.items())
                    + ". Check the tasks' shard lists (tasks.<name>.shards) and the files behind them."
                )
            live.names = names
            live.weights = torch.tensor([self.tasks[n].ratio for n in names], dtype=torch.float64)
        return live.names[int(torch.multinomial(live.weights, 1, generator=live.generator))]

    def _drop(self, live: _Live, task: str, err: EmptyStreamError) -> None:
        live.dropped[task] = str(err)
        live.weights = None
        left = {n: self.tasks[n].ratio for n in self.tasks if n not in live.dropped}
        total = sum(left.values())
        log.warning(
            "task %r dropped from the mixture of slot %s: %s; the tasks left mix as %s",
            task,
            live.slot,
            err,
            {n: round(r / total, 4) for n, r in left.items()} if left else "(none: stopping)",
        )

    def _next(self, live: _Live, iters: dict, task: str) -> dict:
        for _ in range(self.max_consecutive_skips):
            raw = next(iters[task])
            try:
                return decode_sample(self.encoder, raw, live.encode_generator)
            except SampleError as err:
                live.skipped[f"{task}/{err.reason}"] += 1
                if live.skipped[f"{task}/{err.reason}"] <= LOGGED_PER_REASON:
                    log.warning("skipping sample %s of %s: %s", raw.get("__key__"), raw.get("__url__"), err)
        raise RuntimeError(
            f"task {task!r}: {self.max_consecutive_skips} samples in a row were unusable; "
            f"skipped so far: {dict(live.skipped)}"
        )

    # -- torchdata Stateful protocol -------------------------------------------------------------
    def state_dict(self) -> dict:
        live = self._live
        if live is None:
            return self._state or {}
        return {
            "slot": [live.slot.rank, live.slot.world, live.slot.worker, live.slot.num_workers],
            "streams": {name: s.state_dict() for name, s in live.streams.items()},
            "generator": live.generator.get_state(),
            "encode_generator": live.encode_generator.get_state(),
            "skipped": dict(live.skipped),
            "repaired": dict(self.encoder.repaired),
            "dropped": dict(live.dropped),
        }

    def load_state_dict(self, state: dict) -> None:
        self._state = state or None
        self._live = None

    def stats(self) -> dict[str, int]:
        """This worker's counters: see :func:`stats_from_state`."""
        return stats_from_state(self.state_dict())


def stats_from_state(state: object) -> dict[str, int]:
    """Sum the counters of every dataset state found in ``state`` (a loader's, any nesting):
    ``skipped/<task>/<reason>``, ``repaired/<note>``, the stream faults ``shard_error/<task>``,
    ``missing_shard/<task>``, ``truncated_shard/<task>`` (per read attempt), ``duplicate_key/<task>``
    (samples repeating an earlier key of their shard, skipped), ``lost_buffered/<task>``,
    ``shard_list_changed/<task>``, and ``dropped_task/<task>`` (workers that dropped the task)."""
    out: Counter[str] = Counter()
    if isinstance(state, dict):
        if "streams" in state and "skipped" in state:
            out.update({f"skipped/{k}": v for k, v in state["skipped"].items()})
            out.update({f"repaired/{k}": v for k, v in state.get("repaired", {}).items()})
            out.update({f"dropped_task/{k}": 1 for k in state.get("dropped", {})})
            for name, stream in state["streams"].items():
                out.update({f"{reason}/{name}": n for reason, n in stream.get("stats", {}).items()})
        else:
            for value in state.values():
                out.update(stats_from_state(value))
    elif isinstance(state, list):
        for value in state:
            out.update(stats_from_state(value))
    return dict(out)


@dataclass
class _Live:
    streams: dict[str, TaskStream]
    generator: torch.Generator
    slot: Slot

    def __post_init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.dropped: dict[str, str] = {}  # task -> why (the EmptyStreamError message)
        self.names: list[str] = []
        self.weights: torch.Tensor | None = None  # of ``names``; None: recompute (after a drop)
        self.encode_generator = torch.Generator().manual_seed(self.generator.initial_seed() + 1)
