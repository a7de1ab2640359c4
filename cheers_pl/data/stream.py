"""``TaskStream``: an endless, resumable stream of one task's raw samples for one rank and worker.

Order: every epoch the shard list is permuted from ``(seed, epoch)``; shard i goes to slot
``i % slots`` (slot = rank * num_workers + worker). With fewer shards than slots every slot reads
every shard and keeps the samples whose index is its slot modulo ``slots``. Samples then pass a
shuffle buffer (a torch.Generator of its own).

Position: the state is (epoch, position in this slot's shard order, offset in that shard, the
buffer's contents as (epoch, shard position, sample index) references, the generator's state,
the epoch's phase: any sample read yet, empty epochs in a row, draining the buffer; the counters,
and a checksum of the shard list). Loading it re-reads only the shards the buffer references
(skipping, not decoding, earlier samples) and continues at the offset, so the stream goes on
with exactly the samples an uninterrupted one would have produced.

Faults: the shard list is the one given at the start; a shard that has disappeared since is
counted (``missing_shard``) each time its turn comes, one that ends early keeps the samples read
before the cut (``truncated_shard``) and any other unreadable one is counted as ``shard_error``
(see :mod:`cheers_pl.data.shards`); each is logged with its URL and the stream moves on to the
next shard. A sample whose key an earlier sample of the same shard had is skipped and counted
(``duplicate_key``; it would otherwise train twice). A slot that gets no sample at all in two
epochs in a row raises :class:`EmptyStreamError`, with what happened to every shard, instead
of looping for ever.

On resume, buffered samples whose shard has since disappeared or been cut cannot be re-read:
they are counted (``lost_buffered``) and the stream goes on without them. A shard list that
differs from the saved one (files added or removed between runs) cannot be resumed exactly: it
is counted (``shard_list_changed``), logged, and the saved epoch restarts from its first shard.
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
FAULT_MESSAGES = {
    "missing_shard": "is gone (it was listed when the run started); skipping it",
    "truncated_shard": "ends early: keeping the samples before the cut, skipping the rest",
    "shard_error": "is unreadable: skipping the rest of it",
}


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash`` of a str is not)."""
    return zlib.crc32(repr(parts).encode()) + (1 << 32) * (zlib.crc32(repr(parts[::-1]).encode()) % 1000)


class EmptyStreamError(RuntimeError):
    """Two epochs in a row of a task's shards gave this slot no sample; ``status``: url -> what happened."""

    def __init__(self, message: str, status: dict[str, str] | None = None):
        super().__init__(message)
        self.status = dict(status or {})


def shard_list_id(shards: list[str]) -> list[int]:
    """[count, crc32 of the list]: identifies a shard list in a saved state without storing it."""
    return [len(shards), zlib.crc32("\n".join(shards).encode())]


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
        # where the epoch is: any sample read yet, consecutive empty epochs, draining the buffer
        self.produced, self.empty_epochs, self.draining = False, 0, False
        self.buffer: list[tuple[tuple[int, int, int], dict]] = []
        self.stats: Counter[str] = Counter()
        self.status: dict[str, str] = {}  # url -> "ok" or the last fault, for error messages
        self._warned: set[tuple[str, str]] = set()

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
        """This slot's raw samples of ``url`` from index ``start``, repeated keys included (marked)."""
        for raw in read_shard(url, start, mark_duplicates=True):
            if stride == 1 or raw["__index__"] % stride == self.slot.index:
                yield raw

    def _duplicate(self, raw: dict) -> None:
        """Count a sample that repeats an earlier key of its shard (a warning the first time per shard)."""
        self.stats["duplicate_key"] += 1
        first = (raw["__url__"], "duplicate_key") not in self._warned
        self._warned.add((raw["__url__"], "duplicate_key"))
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "task %s: shard %s: sample %d repeats the key %r of an earlier sample of the shard: skipping "
            "it (it would train twice) [duplicate_key]",
            self.name,
            raw["__url__"],
            raw["__index__"],
            raw["__key__"],
        )

    def _fault(self, err: ShardError) -> None:
        """Count a shard fault by kind and log it (a warning the first time per shard and kind)."""
        self.stats[err.kind] += 1
        self.status[err.url] = err.kind if err.kind == "missing_shard" else f"{err.kind} ({err.detail})"
        first = (err.url, err.kind) not in self._warned
        self._warned.add((err.url, err.kind))
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "task %s: shard %s %s [%s: %s]",
            self.name,
            err.url,
            FAULT_MESSAGES.get(err.kind, FAULT_MESSAGES["shard_error"]),
            err.kind,
            err.detail,
        )

    def status_report(self, urls: list[str] | None = None, listed: int = 10) -> str:
        """What happened to ``urls`` (default: every shard), grouped: ``missing_shard: a.tar, b.tar;
        truncated_shard (...): c.tar``, at most ``listed`` URLs per group."""
        groups: dict[str, list[str]] = {}
        for u in sorted(set(self.shards if urls is None else urls)):
            groups.setdefault(self.status.get(u, "not read yet"), []).append(u)
        return "; ".join(
            f"{what}: {', '.join(us[:listed])}"
            + (f" and {len(us) - listed} more" if len(us) > listed else "")
            for what, us in groups.items()
        )

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        while True:
            urls, stride = self.epoch_shards(self.epoch)
            if not self.draining:
                while self.position < len(urls):
                    url = urls[self.position]
                    try:
                        for raw in self._read(url, self.offset, stride):
                            self.offset = raw["__index__"] + 1
                            if raw.get("__duplicate__"):
                                self._duplicate(raw)
                                continue
                            self.produced = True
                            ref = (self.epoch, self.position, raw["__index__"])
                            if self.buffer_size <= 1:
                                yield raw
                                continue
                            self.buffer.append((ref, raw))
                            if len(self.buffer) >= self.buffer_size:
                                yield self._pop()
                        self.status[url] = "ok"
                    except ShardError as err:
                        self._fault(err)
                    self.position, self.offset = self.position + 1, 0
                if not self.produced and not self.buffer:
                    self.empty_epochs += 1
                    if self.empty_epochs >= 2:
                        raise EmptyStreamError(
                            f"task {self.name!r}: no readable sample for slot {self.slot.index} in two "
                            f"epochs of {len(urls)} shard(s): {self.status_report(urls)}",
                            {u: self.status.get(u, "not read yet") for u in urls},
                        )
                else:
                    self.empty_epochs = 0
                self.draining = not self.produced  # drain only if the shards stopped producing
            while self.draining and self.buffer:
                yield self._pop()
            self.epoch, self.position, self.offset = self.epoch + 1, 0, 0
            self.produced = self.draining = False

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
            "shards": shard_list_id(self.shards),
            "phase": [self.produced, self.empty_epochs, self.draining],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; re-reads the shards the saved buffer refers to."""
        self.epoch, self.position, self.offset = state["epoch"], state["position"], state["offset"]
        self.generator.set_state(state["generator"])
        self.stats = Counter(state.get("stats", {}))
        produced, empty, draining = state.get("phase", (False, 0, False))
        self.produced, self.empty_epochs, self.draining = bool(produced), int(empty), bool(draining)
        refs = [tuple(r) for r in state["buffer"]]
        saved = state.get("shards")
        if saved is not None and list(saved) != shard_list_id(self.shards):
            self.stats["shard_list_changed"] += 1
            self.stats["lost_buffered"] += len(refs)
            log.warning(
                "task %s: the shard list changed since the data position was saved (%d shards then, %d now): "
                "the resumed order cannot be the saved one; restarting epoch %d from its first shard "
                "without the %d buffered samples",
                self.name,
                saved[0],
                len(self.shards),
                self.epoch,
                len(refs),
            )
            self.position = self.offset = 0
            self.buffer, self.draining = [], False
            return
        wanted: dict[tuple[int, int], set[int]] = {}
        for epoch, position, index in refs:
            wanted.setdefault((epoch, position), set()).add(index)
        found: dict[tuple[int, int, int], dict] = {}
        for (epoch, position), indices in wanted.items():
            urls, stride = self.epoch_shards(epoch)
            try:
                for raw in self._read(urls[position], min(indices), stride):
                    if raw["__index__"] in indices:
                        found[(epoch, position, raw["__index__"])] = raw
                    if raw["__index__"] >= max(indices):
                        break
            except ShardError as err:
                self._fault(err)
        missing = [r for r in refs if r not in found]
        if missing:
            self.stats["lost_buffered"] += len(missing)
            log.warning(
                "task %s: %d buffered samples could not be re-read on resume (first: epoch, shard "
                "position, index %s; their shards changed): going on without them",
                self.name,
                len(missing),
                missing[:3],
            )
        self.buffer = [(r, found[r]) for r in refs if r in found]
