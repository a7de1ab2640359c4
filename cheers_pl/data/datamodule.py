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

The processor (tokenizer, tokens per image, CFG dropout, max length) and the image size come
from the model being trained (its ``model.processor`` and ``model.image_size``) at ``setup``, or
from :meth:`CheersDataModule.attach` when used on its own.

``state_dict`` holds where every rank and every worker is (see :class:`RankStatefulLoader`), so a
resumed run sees exactly the samples an uninterrupted run would have seen next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from cheers_pl.components.processor import CheersProcessor
from cheers_pl.data.mixture import MixtureDataset, TaskSource, check_mixture, stats_from_state
from cheers_pl.data.shards import expand_shards
from cheers_pl.data.transforms import SampleEncoder


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankStatefulLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state holds every rank's position, not just this rank's.

    Lightning writes checkpoints from rank 0 only; gathering here means the one file restores
    every rank. ``load_state_dict`` picks this rank's part and refuses a different world size.
    """

    def state_dict(self) -> dict[str, Any]:
        rank, world = _rank_world()
        mine = super().state_dict()
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
    """

    def __init__(
        self,
        tasks: dict[str, dict[str, Any]],
        mixture: str = "sample",
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        image_size: int | None = None,
        cfg_dropout: float | None = None,
        root: str | None = None,
    ):
        super().__init__()
        self.root = root
        self.sources = {
            name: TaskSource(**cfg) if isinstance(cfg, dict) else cfg for name, cfg in tasks.items()
        }
        check_mixture(self.sources, mixture)
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
        for src in self.sources.values():
            src.shards = expand_shards([self._rooted(spec) for spec in src.shards])

    def _rooted(self, spec: str) -> str:
        if self.root is None or "://" in spec or spec.startswith("pipe:") or Path(spec).is_absolute():
            return spec
        return str(Path(self.root) / spec)

    def dataset(self) -> MixtureDataset:
        if self.processor is None or self.image_size is None:
            raise RuntimeError("call attach(processor, image_size) or setup() first")
        encoder = SampleEncoder(self.processor, self.image_size, self.cfg_dropout)
        return MixtureDataset(
            self.sources, encoder, self.batch_size, self.mixture, self.seed, self.shuffle_buffer
        )

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
        """Skipped samples by task and reason, shard errors and colour repairs, summed over workers
        (and over ranks: the loader state holds all of them)."""
        return stats_from_state(self._loader.state_dict()) if self._loader is not None else {}

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
