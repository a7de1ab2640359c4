"""``MixtureDataset``: task streams mixed by ratio, per sample or per whole batch, yielding batches.

``mode="sample"`` draws each sample's task with probability proportional to its ratio (stages
II/III: understanding : generation : text = 3 : 6 : 1); ``mode="batch"`` draws one task per
batch (stage IV: understanding : generation batches 1 : 1). Batches are assembled in the worker,
so the state after each batch (every task stream's position, the mixing generator, the skip
counters) is what torchdata's ``StatefulDataLoader`` saves.

A sample that fails (bad JSON, corrupt image, too long, ...) is skipped and counted by task and
reason; the first few per reason are logged with their shard and key.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from cheers_pl.data.schema import SampleError, from_raw
from cheers_pl.data.stream import Slot, TaskStream, stable_seed
from cheers_pl.data.transforms import SampleEncoder, collate

log = logging.getLogger(__name__)
MIXTURE_MODES = ("sample", "batch")
LOGGED_PER_REASON = 5


@dataclass
class TaskSource:
    """One task of a mixture: its shard URLs and its mixing ratio."""

    shards: list[str]
    ratio: float = 1.0


def check_mixture(tasks: dict[str, TaskSource], mode: str) -> None:
    """Raise ``ValueError`` naming the key for bad modes, ratios or empty shard lists."""
    if mode not in MIXTURE_MODES:
        raise ValueError(f"mixture={mode!r}; valid choices are {list(MIXTURE_MODES)}")
    if not tasks:
        raise ValueError("tasks: at least one task is needed")
    for name, src in tasks.items():
        if src.ratio < 0:
            raise ValueError(f"tasks.{name}.ratio={src.ratio} is negative")
        if src.ratio > 0 and not src.shards:
            raise ValueError(f"tasks.{name}.shards is empty but its ratio is {src.ratio}")
    if sum(src.ratio for src in tasks.values()) <= 0:
        raise ValueError(f"tasks: all ratios are zero ({ {n: s.ratio for n, s in tasks.items()} })")


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
            self.encoder.repaired.update(self._state.get("repaired", {}))
            live.encode_generator.set_state(self._state["encode_generator"])
            self._state = None
        return live

    def __iter__(self):
        live = self._live = self._start()
        iters = {name: iter(stream) for name, stream in live.streams.items()}
        names = list(self.tasks)
        weights = torch.tensor([self.tasks[n].ratio for n in names], dtype=torch.float64)
        draw = lambda: names[int(torch.multinomial(weights, 1, generator=live.generator))]  # noqa: E731
        while True:
            if self.mode == "batch":
                task = draw()
                picks = [task] * self.batch_size
            else:
                picks = [draw() for _ in range(self.batch_size)]
            yield collate(self.encoder.processor, [self._next(live, iters, t) for t in picks])

    def _next(self, live: _Live, iters: dict, task: str) -> dict:
        for _ in range(self.max_consecutive_skips):
            raw = next(iters[task])
            try:
                return self.encoder(from_raw(raw), live.encode_generator)
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
        }

    def load_state_dict(self, state: dict) -> None:
        self._state = state or None
        self._live = None

    def stats(self) -> dict[str, int]:
        """This worker's counters: see :func:`stats_from_state`."""
        return stats_from_state(self.state_dict())


def stats_from_state(state: object) -> dict[str, int]:
    """Sum the counters of every dataset state found in ``state`` (a loader's, any nesting):
    ``skipped/<task>/<reason>``, ``shard_error/<task>``, ``repaired/<note>``."""
    out: Counter[str] = Counter()
    if isinstance(state, dict):
        if "streams" in state and "skipped" in state:
            out.update({f"skipped/{k}": v for k, v in state["skipped"].items()})
            out.update({f"repaired/{k}": v for k, v in state.get("repaired", {}).items()})
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
        self.encode_generator = torch.Generator().manual_seed(self.generator.initial_seed() + 1)
