"""Turn a schema :class:`~cheers_pl.data.schema.Sample` into model inputs, and pad them into a batch.

Per sample: every image is decoded (colour modes repaired) and preprocessed by its marker,
``<image>`` -> :func:`resize_pad`, ``<image_gen>`` -> :func:`resize_crop`; the chat is tokenised
and label-masked by the model's :class:`~cheers_pl.components.processor.CheersProcessor`, with CFG
dropout (probability ``cfg_dropout``) on generation and edit samples.

Too long: a sample over the processor's ``max_length`` (``spec.max_length``) is skipped
(``too_long="skip"``, counted as ``too_long``) or cut to fit (``"truncate"``: text after the last
image is dropped, counted in ``repaired`` as ``truncated``; one whose image spans do not fit is
still skipped). With ``spec.max_length`` null, samples over :data:`MAX_LENGTH_CEILING` tokens are
skipped all the same: one 100k-character caption would otherwise ask for a (B, 1, L, L)
attention mask of tens of GB.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from cheers_pl.components.processor import CheersProcessor, SequenceTooLongError
from cheers_pl.components.tokenizer import IGNORE_INDEX
from cheers_pl.data.images import decode_image, resize_crop, resize_pad, to_tensor
from cheers_pl.data.schema import IMAGE, TASKS, Sample, SampleError

TOO_LONG_MODES = ("skip", "truncate")
# The limit when spec.max_length is null: Qwen2.5's context (max_position_embeddings); a batch of
# 8 such rows already needs an 8 GiB boolean attention mask.
MAX_LENGTH_CEILING = 32768


class SampleEncoder:
    """``Sample`` -> ``{"input_ids" (L,), "labels" (L,), "images": [(3,S,S), ...], "id", "task"}``.

    ``too_long``: "skip" or "truncate" (module docstring); ``repaired`` counts image colour-mode
    repairs and truncations.
    """

    def __init__(
        self,
        processor: CheersProcessor,
        image_size: int,
        cfg_dropout: float | None = None,
        too_long: str = "skip",
    ):
        if too_long not in TOO_LONG_MODES:
            raise ValueError(f"too_long={too_long!r} is not valid; valid choices are {list(TOO_LONG_MODES)}")
        self.processor, self.image_size, self.too_long = processor, image_size, too_long
        self.cfg_dropout = processor.cfg_dropout if cfg_dropout is None else cfg_dropout
        self.max_length = processor.max_length or MAX_LENGTH_CEILING
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
            enc = self.processor.encode(
                sample.messages,
                num_images=len(images),
                cfg_drop=drop,
                truncate=self.too_long == "truncate",
                max_length=self.max_length,
            )
        except SequenceTooLongError as err:
            raise SampleError("too_long", str(err)) from None
        except ValueError as err:
            raise SampleError("bad_layout", str(err)) from None
        if enc.pop("truncated", 0):
            self.repaired["truncated"] += 1
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
