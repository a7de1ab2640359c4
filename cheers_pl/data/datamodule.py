"""``CheersDataModule``: streams WebDataset shards into the model's mixed batches, resumably.

YAML (LightningCLI ``data:`` section)::

    data:
      class_path: cheers_pl.data.datamodule.CheersDataModule
      init_args:
        tasks:
          understanding: {shards: ["data/und-{000000..000099}.tar"], ratio: 3}
          generation:    {shards: ["data/gen/"], ratio: 6}
          text:          {shards: ["https://host/text-{0000..0009}.tar"], ratio: 1}
        mixture: sample          # or batch (one task per batch: stage IV's 1 : 1)
        batch_size: 4            # per device
        num_workers: 4
        too_long: skip           # or truncate: samples over spec.max_length tokens

The processor (tokenizer, tokens per image, CFG dropout, max length) and the image size come
from the model being trained (its ``model.processor`` and ``model.image_size``) at ``setup``, or
from :meth:`CheersDataModule.attach` when used on its own.

``state_dict`` holds where every rank and every worker is (see :class:`RankStatefulLoader`), so a
resumed run sees exactly the samples an uninterrupted run would have seen next.

Faults (counted in :meth:`CheersDataModule.data_stats`): at ``setup``, a shard spec that matches
no file is logged and counted (``missing_spec/<task>``) and a task left with no shard at all is
dropped from the mixture with a warning (``empty_task/<task>``; the other ratios renormalised,
see ``CheersDataModule.ratios``); only when every task is empty does ``setup`` raise
``FileNotFoundError``. While streaming, shards that disappear or are cut, bad samples and tasks
left with nothing readable are handled by :mod:`~cheers_pl.data.stream` and
:mod:`~cheers_pl.data.mixture`. A DataLoader worker process that dies (killed, out of memory,
crashed) stops the run with :class:`DataWorkerDiedError`, which says which worker and how to
resume from the last checkpoint: the dead worker's stream position cannot be recovered.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch.distributed as dist
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt
from torchdata.stateful_dataloader import StatefulDataLoader

from cheers_pl.components.processor import CheersProcessor
from cheers_pl.data.mixture import MixtureDataset, TaskSource, check_mixture, stats_from_state
from cheers_pl.data.shards import resolve_shards
from cheers_pl.data.transforms import MAX_LENGTH_CEILING, TOO_LONG_MODES, SampleEncoder

log = logging.getLogger(__name__)
# PyTorch's messages for a worker process that is gone (not for an exception raised in a worker,
# which it re-raises as "Caught <Error> in DataLoader worker process N").
_WORKER_GONE = re.compile(r"DataLoader worker \(pid")
RESUME_HINT = (
    "The last data position is in the last checkpoint (each checkpoint holds every rank's and "
    "worker's): resume from it with `cheers fit -c CONFIG --ckpt_path last` "
    "(or Trainer.fit(..., ckpt_path='last'))."
)


class DataWorkerDiedError(RuntimeError):
    """A DataLoader worker process died mid-run; the message names it and says how to resume."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Fetching:
    """How many guarded iterators are inside ``__next__`` right now (signal handlers run in the
    main thread, between two bytecodes of whatever it was doing)."""

    depth = 0


_previous_sigchld: Any = None


def _sigchld_guard(signum, frame) -> None:
    """PyTorch's SIGCHLD handler raises "DataLoader worker (pid N) is killed by signal" wherever
    the main thread happens to be, a training step included. Outside a batch fetch this keeps it
    for the next fetch, which then raises :class:`DataWorkerDiedError` with the whole story."""
    try:
        if callable(_previous_sigchld):
            _previous_sigchld(signum, frame)
    except RuntimeError as err:
        if _Fetching.depth > 0 or not _WORKER_GONE.search(str(err)):
            raise
        log.error("%s (the train loader stops at its next batch)", err)


def _install_sigchld_guard() -> None:
    global _previous_sigchld
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGCHLD)
    if current is _sigchld_guard or not callable(current):
        return
    _previous_sigchld = current
    signal.signal(signal.SIGCHLD, _sigchld_guard)


def _dead_workers(inner: Any) -> list[tuple[int, Any]]:
    """(index, process) of the workers of a multi-process loader iterator that have exited."""
    if getattr(inner, "_shutdown", True):
        return []
    return [(i, w) for i, w in enumerate(getattr(inner, "_workers", [])) if w.exitcode is not None]


def _how(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _IteratorProxy:
    """Wraps the loader's iterator; anything else asked of it goes to the wrapped one."""

    def __init__(self, loader: RankStatefulLoader, inner: Any):
        self._loader, self._inner = loader, inner

    def __iter__(self) -> _IteratorProxy:
        return self

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        if name in ("_inner", "_loader"):  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __reduce__(self):
        return (type(None), ())  # pickled as None, as Lightning does with DataLoader iterators


class _GuardedIterator(_IteratorProxy):
    """The loader's own iterator, with a dead worker turned into :class:`DataWorkerDiedError`."""

    def __next__(self) -> Any:
        dead = _dead_workers(self._inner)
        if dead:
            self._fail(dead, None)
        _Fetching.depth += 1
        try:
            return next(self._inner)
        except Exception as err:  # noqa: BLE001 - sorted out below, outside the fetch
            cause = err
        finally:
            _Fetching.depth -= 1
        gone = isinstance(cause, RuntimeError) and bool(_WORKER_GONE.search(str(cause)))
        if not isinstance(cause, DataWorkerDiedError) and (gone or isinstance(cause, (OSError, EOFError))):
            dead = self._wait_for_dead()  # an OSError: a batch whose sender died while handing it over
            if dead or gone:
                self._fail(dead, cause)
        raise cause

    def _wait_for_dead(self, seconds: float = 2.0) -> list[tuple[int, Any]]:
        """The dead workers, waiting a little: a killed process takes a moment to be seen as dead."""
        deadline = time.monotonic() + seconds
        while not (dead := _dead_workers(self._inner)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return dead

    def _fail(self, dead: list[tuple[int, Any]], cause: Exception | None) -> None:
        workers = getattr(self._inner, "_num_workers", self._loader.num_workers)
        who = "; ".join(f"worker {i} of {workers} (pid {w.pid}) {_how(w.exitcode)}" for i, w in dead)
        error = DataWorkerDiedError(
            f"A DataLoader worker process of the train loader died: {who or cause}. The usual cause is "
            "the out-of-memory killer (see `dmesg`; fewer num_workers or a smaller shuffle_buffer need "
            "less memory), otherwise a crash in native decoding code. The worker's position in the data "
            "streams is lost with it, so this run cannot go on with exactly the data it would have seen. "
            + RESUME_HINT
        )
        self._loader._worker_died = error
        try:  # the other workers are of no use now
            self._inner._shutdown_workers()
        except Exception as err:  # noqa: BLE001 - best effort, the error below is what matters
            log.debug("shutting down the other workers failed: %s", err)
        raise error from cause


class _Positions:
    """The loader's state after each yielded batch, from the last consumed one on.

    ``after[k]`` is the state once k batches were yielded (``after[0]``: the start). Before any
    consumption is reported (a loader iterated by hand) :meth:`consumed_state` is None: the live
    state applies.
    """

    def __init__(self, start: dict[str, Any]):
        self.after, self.yielded, self.used, self.reported = {0: start}, 0, 0, False

    def yielded_one(self, state: dict[str, Any]) -> None:
        self.yielded += 1
        self.after[self.yielded] = state

    def consume(self) -> None:
        self.reported = True
        self.used = min(self.used + 1, self.yielded)
        for k in [k for k in self.after if k < self.used]:
            del self.after[k]

    def consumed_state(self) -> dict[str, Any] | None:
        return self.after[self.used] if self.reported else None


class _TrackedIterator(_IteratorProxy):
    """The loader's iterator, recording the loader's state after every batch it yields."""

    def __next__(self) -> Any:
        batch = next(self._inner)
        positions = self._loader._positions
        if positions is not None:
            positions.yielded_one(StatefulDataLoader.state_dict(self._loader))
        return batch


class RankStatefulLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state holds every rank's position, not just this rank's.

    Lightning writes checkpoints from rank 0 only; gathering here means the one file restores
    every rank. ``load_state_dict`` picks this rank's part and refuses a different world size.

    With workers, iterating it raises :class:`DataWorkerDiedError` (instead of PyTorch's
    "DataLoader worker (pid N) exited unexpectedly", possibly from inside a training step) when a
    worker process dies; the loader then refuses to start again.
    """

    _worker_died: DataWorkerDiedError | None = None
    _positions: _Positions | None = None

    def __iter__(self):
        if self._worker_died is not None:
            raise DataWorkerDiedError(str(self._worker_died))
        inner = super().__iter__()
        if self.num_workers > 0:
            _install_sigchld_guard()
            inner = _GuardedIterator(self, inner)
        self._positions = _Positions(StatefulDataLoader.state_dict(self))
        return _TrackedIterator(self, inner)

    def consumed(self) -> None:
        """One more batch reached the training step (``CheersDataModule.on_before_batch_transfer``).

        Lightning fetches a batch ahead of the step that uses it, so at a checkpoint the loader has
        already yielded one batch more than training consumed. Once consumption is reported,
        :meth:`state_dict` is the position right after the last consumed batch: a resumed run
        starts with the batch that was fetched but never trained on.
        """
        if self._positions is not None:
            self._positions.consume()

    def state_dict(self) -> dict[str, Any]:
        rank, world = _rank_world()
        live = self._positions.consumed_state() if self._positions is not None else None
        mine = live if live is not None else super().state_dict()
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        return {"world_size": world, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = _rank_world()
        if state.get("world_size") != world:
            raise RuntimeError(
                f"the data position was saved with {state.get('world_size')} ranks; this run has {world}"
            )
        super().load_state_dict(state["ranks"][rank])


def check_options(shuffle_buffer: Any, cfg_dropout: Any, too_long: Any) -> None:
    """Raise ``ValueError`` naming the ``data.*`` key and its valid range for a bad value."""
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(
            f"data.shuffle_buffer={shuffle_buffer!r} is not valid: samples held for shuffling per task "
            "stream, an int >= 0 (0: no shuffling)"
        )
    if cfg_dropout is not None and (
        isinstance(cfg_dropout, bool)
        or not isinstance(cfg_dropout, (int, float))
        or not 0.0 <= cfg_dropout <= 1.0  # NaN fails this too
    ):
        raise ValueError(
            f"data.cfg_dropout={cfg_dropout!r} is not valid: a probability in [0, 1], or null "
            "(the model spec's cfg_dropout)"
        )
    if too_long not in TOO_LONG_MODES:
        raise ValueError(f"data.too_long={too_long!r} is not valid; valid choices are {list(TOO_LONG_MODES)}")


class CheersDataModule(L.LightningDataModule):
    """Mixed-task WebDataset streaming for CHEERS training (see the module docstring).

    Args:
        tasks: task name -> ``{"shards": [...], "ratio": float}`` (names from the sample schema).
        mixture: ``"sample"`` (each sample's task by ratio) or ``"batch"`` (each batch's task).
        batch_size: samples per batch per device.
        num_workers: DataLoader workers per device.
        shuffle_buffer: samples held for shuffling in each task stream (0: no shuffling).
        seed: seeds the shard order, the shuffle buffers, the mixing and CFG dropout.
        image_size: overrides the model's image size (normally taken from the model).
        cfg_dropout: overrides the model spec's CFG dropout rate.
        root: folder that relative shard specs are relative to (URLs and absolute paths ignore it).
        too_long: what happens to a sample over ``spec.max_length`` tokens: "skip" (counted as
            ``skipped/<task>/too_long``) or "truncate" (text after its last image is cut, counted
            as ``repaired/truncated``; a sample whose images do not fit is still skipped).
    """

    def __init__(
        self,
        tasks: dict[str, dict[str, Any]],
        mixture: str = "sample",
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: NonNegativeInt = 1000,  # restricted types: the CLI refuses bad values at parse time
        seed: int = 0,
        image_size: int | None = None,
        cfg_dropout: ClosedUnitInterval | None = None,
        root: str | None = None,
        too_long: Literal["skip", "truncate"] = "skip",
    ):
        super().__init__()
        self.root = root
        check_options(shuffle_buffer, cfg_dropout, too_long)
        self.too_long = too_long
        check_mixture(tasks, mixture)  # the plain YAML dicts: unknown keys are named, not a TypeError
        self.sources = {
            name: TaskSource(**cfg) if isinstance(cfg, dict) else cfg for name, cfg in tasks.items()
        }
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.mixture, self.batch_size, self.num_workers = mixture, batch_size, num_workers
        self.shuffle_buffer, self.seed, self.image_size, self.cfg_dropout = (
            shuffle_buffer,
            seed,
            image_size,
            cfg_dropout,
        )
        self.processor: CheersProcessor | None = None
        self._loader: RankStatefulLoader | None = None
        self._pending_state: dict | None = None
        self._tasks: dict[str, TaskSource] | None = None  # after setup: shard lists expanded
        self._setup_stats: Counter[str] = Counter()
        self.ratios: dict[str, float] = {}  # after setup: each streamed task's share of the mixture

    def attach(self, processor: CheersProcessor, image_size: int | None = None) -> CheersDataModule:
        """Use ``processor`` (and ``image_size``) when no trainer gives them through the model."""
        self.processor = processor
        self.image_size = self.image_size or image_size
        return self

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            module = getattr(self.trainer, "lightning_module", None)
            if module is None or not hasattr(module, "processor"):
                raise RuntimeError(
                    "CheersDataModule needs a processor: train a CHEERS stage, or call attach()"
                )
            self.attach(module.processor, module.image_size)
        if self.processor.max_length is None:
            log.warning(
                "spec.max_length is null: samples over %d tokens are skipped all the same (too_long); "
                "set model.init_args.spec.max_length to the stage's token budget",
                MAX_LENGTH_CEILING,
            )
        self._tasks = self._resolve()

    def _resolve(self) -> dict[str, TaskSource]:
        """Expand every task's shard specs; drop (and count) what matches nothing, see the module doc."""
        stats: Counter[str] = Counter()
        found: dict[str, tuple[TaskSource, list[str]]] = {}
        for name, src in self.sources.items():
            urls, problems = resolve_shards([self._rooted(spec) for spec in src.shards])
            if problems and src.ratio > 0:
                stats[f"missing_spec/{name}"] += len(problems)
                log.warning("task %r: %s", name, "; ".join(problems) + ("" if urls else " (nothing left)"))
            found[name] = (TaskSource(urls, src.ratio), problems)
        streamed = {n: src for n, (src, _) in found.items() if src.ratio > 0 and src.shards}
        if not streamed:
            raise FileNotFoundError(
                "no task has any shard file: "
                + " | ".join(f"{n}: {'; '.join(p) or 'no shards'}" for n, (_, p) in found.items())
            )
        total = sum(src.ratio for src in streamed.values())
        self.ratios = {n: src.ratio / total for n, src in streamed.items()}
        for name, (src, problems) in found.items():
            if src.ratio > 0 and not src.shards:
                stats[f"empty_task/{name}"] = 1
                log.warning(
                    "task %r dropped from the mixture: tasks.%s.shards=%s matches no shard file (%s); "
                    "the tasks left mix as %s",
                    name,
                    name,
                    self.sources[name].shards,
                    "; ".join(problems),
                    {n: round(r, 4) for n, r in self.ratios.items()},
                )
        self._setup_stats = stats
        return streamed

    def _rooted(self, spec: str) -> str:
        if self.root is None or "://" in spec or spec.startswith("pipe:") or Path(spec).is_absolute():
            return spec
        return str(Path(self.root) / spec)

    def dataset(self) -> MixtureDataset:
        if self.processor is None or self.image_size is None:
            raise RuntimeError("call attach(processor, image_size) or setup() first")
        encoder = SampleEncoder(self.processor, self.image_size, self.cfg_dropout, self.too_long)
        tasks = self._tasks if self._tasks is not None else self.sources
        return MixtureDataset(tasks, encoder, self.batch_size, self.mixture, self.seed, self.shuffle_buffer)

    def train_dataloader(self) -> RankStatefulLoader:
        loader = RankStatefulLoader(
            self.dataset(),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._loader = loader
        return loader

    def data_stats(self) -> dict[str, int]:
        """What was skipped, repaired or dropped, summed over workers (and over ranks: the loader
        state holds all of them): the setup counters ``missing_spec/<task>`` and
        ``empty_task/<task>``, and the streaming ones of
        :func:`~cheers_pl.data.mixture.stats_from_state` (``skipped/<task>/<reason>``,
        ``missing_shard/<task>``, ``truncated_shard/<task>``, ``shard_error/<task>``,
        ``dropped_task/<task>``, ...). Only counters that are not zero appear."""
        out = Counter(self._setup_stats)
        if self._loader is not None:
            out.update(stats_from_state(self._loader.state_dict()))
        return dict(out)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this when a batch goes to the step (not when it is prefetched)."""
        if self._loader is not None:
            self._loader.consumed()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's and worker's position (saved in Lightning checkpoints)."""
        return self._loader.state_dict() if self._loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; applied when the next train loader is built."""
        if state:
            self._pending_state = state
            if self._loader is not None:
                self._loader.load_state_dict(state)
                self._pending_state = None
