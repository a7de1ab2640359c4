"""``TaskStream``: an endless, resumable stream of one task's raw samples for one rank and worker.

Order: every epoch the shard list is permuted from ``(seed, epoch)``; shard i goes to slot
``i % slots`` (slot = rank * num_workers + worker). With fewer shards than slots every slot reads
every shard and keeps the samples whose index is its slot modulo ``slots``. Samples then pass a
shuffle buffer (a torch.Generator of its own).

Position: the state is (epoch, position in this slot's shard order, offset in that shard, the
buffer's contents as (epoch, shard position, sample index) references, the generator's state).
Loading it re-reads only the shards the buffer references (skipping, not decoding, earlier
samples) and continues at the offset, so the stream goes on with exactly the samples an
uninterrupted one would have produced.

A shard that cannot be opened or breaks off mid-way is counted (``shard_error``), reported with
its URL, and the stream moves on to the next shard.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cheers_pl.data.shards import ShardError, read_shard

log = logging.getLogger(__name__)


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash`` of a str is not)."""
    return zlib.crc32(repr(parts).encode()) + (1 << 32) * (zlib.crc32(repr(parts[::-1]).encode()) % 1000)


class EmptyStreamError(RuntimeError):
    """A whole epoch of a task's shards gave this slot no sample."""


@dataclass(frozen=True)
class Slot:
    """Where a stream runs: its rank among ``world`` ranks and worker among ``num_workers``."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world * self.num_workers


class TaskStream:
    """Endless raw samples of one task for one :class:`Slot` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        shards: list[str],
        slot: Slot,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
    ):
        if not shards:
            raise ValueError(f"task {name!r} has no shards")
        self.name, self.shards, self.slot = name, list(shards), slot
        self.seed, self.buffer_size, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        self.generator = torch.Generator().manual_seed(stable_seed(seed, name, slot.index))
        self.epoch = self.position = self.offset = 0
        self.buffer: list[tuple[tuple[int, int, int], dict]] = []
        self.stats: Counter[str] = Counter()

    # -- order ---------------------------------------------------------------------------------
    def epoch_shards(self, epoch: int) -> tuple[list[str], int]:
        """(this slot's shards for ``epoch``, the sample-index stride: 1, or ``slots`` if shared)."""
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.shards), generator=g).tolist()
        urls = [self.shards[i] for i in order]
        if len(urls) >= self.slot.count:
            return urls[self.slot.index :: self.slot.count], 1
        return urls, self.slot.count

    def _read(self, url: str, start: int, stride: int) -> Iterator[dict]:
        for raw in read_shard(url, start):
            if stride == 1 or raw["__index__"] % stride == self.slot.index:
                yield raw

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        empty_epochs = 0
        while True:
            urls, stride = self.epoch_shards(self.epoch)
            produced = False
            while self.position < len(urls):
                url = urls[self.position]
                try:
                    for raw in self._read(url, self.offset, stride):
                        self.offset = raw["__index__"] + 1
                        produced = True
                        ref = (self.epoch, self.position, raw["__index__"])
                        if self.buffer_size <= 1:
                            yield raw
                            continue
                        self.buffer.append((ref, raw))
                        if len(self.buffer) >= self.buffer_size:
                            yield self._pop()
                except ShardError as err:
                    self.stats["shard_error"] += 1
                    log.warning("task %s: skipping the rest of %s", self.name, err)
                self.position, self.offset = self.position + 1, 0
            if not produced and not self.buffer:
                empty_epochs += 1
                if empty_epochs >= 2:
                    raise EmptyStreamError(f"task {self.name!r}: no readable sample in {len(urls)} shard(s)")
            else:
                empty_epochs = 0
            self.epoch, self.position, self.offset = self.epoch + 1, 0, 0
            while self.buffer and not produced:  # drain only if the shards stopped producing
                yield self._pop()

    def _pop(self) -> dict:
        j = int(torch.randint(len(self.buffer), (1,), generator=self.generator))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()[1]

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "offset": self.offset,
            "buffer": [list(ref) for ref, _ in self.buffer],
            "generator": self.generator.get_state(),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.offset = state["epoch"], state["position"], state["offset"]
        self.generator.set_state(state["generator"])
        self.stats = Counter(state.get("stats", {}))
        refs = [tuple(r) for r in state["buffer"]]
        wanted: dict[tuple[int, int], set[int]] = {}
        for epoch, position, index in refs:
            wanted.setdefault((epoch, position), set()).add(index)
        found: dict[tuple[int, int, int], dict] = {}
        for (epoch, position), indices in wanted.items():
            urls, stride = self.epoch_shards(epoch)
            for raw in self._read(urls[position], min(indices), stride):
                if raw["__index__"] in indices:
                    found[(epoch, position, raw["__index__"])] = raw
                if raw["__index__"] >= max(indices):
                    break
        missing = [r for r in refs if r not in found]
        if missing:
            raise RuntimeError(
                f"task {self.name!r}: cannot restore {len(missing)} buffered samples {missing[:3]}"
            )
        self.buffer = [(r, found[r]) for r in refs]
