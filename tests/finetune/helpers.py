"""Helpers of the LoRA tests: an own-data set made with the recipes, a base model, a stop callback."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from cheers_pl.cli import main
from cheers_pl.data.datamodule import CheersDataModule

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe")


def own_photos(root: Path) -> Path:
    """A folder of 16 small photos (4 colours x 2 shapes x 2) with ``captions.jsonl`` (imagefolder
    recipe) and ``chats.jsonl`` (LLaVA records: "What colour is the shape?"); returns ``root``."""
    rng = np.random.default_rng(0)
    captions, chats = [], []
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for k in range(2):
                a = np.full((64, 64, 3), 245, np.uint8)
                if shape == "square":
                    a[16:48, 16:48] = rgb
                else:
                    a[:, 8 * (k + 1) : 8 * (k + 1) + 16] = rgb
                a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
                rel = f"{color}/{shape}_{k}.png"
                (root / "photos" / color).mkdir(parents=True, exist_ok=True)
                Image.fromarray(a).save(root / "photos" / rel)
                captions.append({"image": rel, "caption": f"a {color} {shape} on white"})
                turns = [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": f"It is {color}."},
                ]
                chats.append({"id": f"{color}-{shape}-{k}", "image": rel, "conversations": turns})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return root


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
