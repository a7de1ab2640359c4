"""Helpers of the LoRA tests: an own-data set made with the recipes, a base model, a stop callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from cheers_pl.cli import main
from cheers_pl.data.datamodule import CheersDataModule
from cheers_pl.finetune.example import write_example


def own_photos(root: Path) -> Path:
    """The README's example own-data folder: 16 photos, ``captions.jsonl``, ``chats.jsonl``."""
    return write_example(root)


def own_shards(raw: Path, out: Path) -> Path:
    """The README's recipe commands: ``out/generation`` (imagefolder) and ``out/understanding`` (llava)."""
    photos = str(raw / "photos")
    gen = ["data", "imagefolder", photos, "--captions", str(raw / "captions.jsonl")]
    assert main([*gen, "--out", str(out / "generation")]) == 0
    und = ["data", "llava", str(raw / "chats.jsonl"), "--image-root", photos]
    assert main([*und, "--out", str(out / "understanding")]) == 0
    return out


def fixed_batches(model, shards: Path, n: int = 4, batch_size: int = 8) -> list[dict]:
    """``n`` batches of the own data (both tasks), in a fixed order, no CFG dropout."""
    dm = CheersDataModule(
        {
            "generation": {"shards": [str(shards / "generation")]},
            "understanding": {"shards": [str(shards / "understanding")]},
        },
        batch_size=batch_size,
        shuffle_buffer=0,
        seed=0,
        cfg_dropout=0.0,
    )
    dm.attach(model.processor, model.image_size).setup()
    batches = iter(dm.train_dataloader())
    return [next(batches) for _ in range(n)]


@torch.no_grad()
def mean_loss(model, batches: list[dict]) -> float:
    """Mean loss over ``batches`` with the flow noise and times drawn from a fixed seed."""
    model.eval()
    return sum(
        float(model(b, generator=torch.Generator().manual_seed(i)).loss) for i, b in enumerate(batches)
    ) / len(batches)


class StopAt(L.Callback):
    """Stops the fit after global step ``step`` (same ``max_steps``, so the same LR schedule)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
