"""Turn a schema :class:`~cheers_pl.data.schema.Sample` into model inputs, and pad them into a batch.

Per sample: every image is decoded (colour modes repaired) and preprocessed by its marker,
``<image>`` -> :func:`resize_pad`, ``<image_gen>`` -> :func:`resize_crop`; the chat is tokenised
and label-masked by the model's :class:`~cheers_pl.components.processor.CheersProcessor`, with CFG
dropout (probability ``cfg_dropout``) on generation and edit samples.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from cheers_pl.components.processor import CheersProcessor, SequenceTooLongError
from cheers_pl.components.tokenizer import IGNORE_INDEX
from cheers_pl.data.images import decode_image, resize_crop, resize_pad, to_tensor
from cheers_pl.data.schema import IMAGE, TASKS, Sample, SampleError


class SampleEncoder:
    """``Sample`` -> ``{"input_ids" (L,), "labels" (L,), "images": [(3,S,S), ...], "id", "task"}``."""

    def __init__(self, processor: CheersProcessor, image_size: int, cfg_dropout: float | None = None):
        self.processor, self.image_size = processor, image_size
        self.cfg_dropout = processor.cfg_dropout if cfg_dropout is None else cfg_dropout
        self.repaired: Counter[str] = Counter()

    def images(self, sample: Sample) -> list[Tensor]:
        out = []
        for (_, marker), data in zip(sample.markers(), sample.images, strict=True):
            img, note = decode_image(data)
            if note:
                self.repaired[note] += 1
            prep = resize_pad if marker == IMAGE else resize_crop
            out.append(to_tensor(prep(img, self.image_size)))
        return out

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> dict:
        images = self.images(sample)
        drop = sample.task in ("generation", "edit") and bool(
            torch.rand((), generator=generator) < self.cfg_dropout
        )
        try:
            enc = self.processor.encode(sample.messages, num_images=len(images), cfg_drop=drop)
        except SequenceTooLongError as err:
            raise SampleError("too_long", str(err)) from None
        except ValueError as err:
            raise SampleError("bad_layout", str(err)) from None
        return {**enc, "images": images, "id": sample.id, "task": sample.task, "cfg_drop": drop}


def collate(processor: CheersProcessor, samples: list[dict]) -> dict:
    """Right-padded batch in the model's format, plus ``ids``, ``tasks`` and ``cfg_drop`` lists.

    ``images`` (N, 3, S, S) stacks every sample's images in order (absent when there are none).
    The gather indices of ``CheersProcessor.batch_index`` are computed here, on the loader's CPU,
    so that the training step needs no host-device sync; ``text_counts`` (a list, B ints) is the
    number of supervised tokens per sample and ``task_index`` (B,) each sample's index in
    ``schema.TASKS``, for the per-task losses the stage logs.
    """
    batch = processor.collate(samples)
    batch.update(processor.batch_index(batch["input_ids"], batch["attention_mask"], batch["labels"]))
    batch["text_counts"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).tolist()
    images = [img for s in samples for img in s["images"]]
    if images:
        batch["images"] = torch.stack(images)
    batch["ids"] = [s["id"] for s in samples]
    batch["tasks"] = [s["task"] for s in samples]
    batch["task_index"] = torch.tensor([TASKS.index(s["task"]) for s in samples])
    batch["cfg_drop"] = [s["cfg_drop"] for s in samples]
    return batch
