"""Held-out losses with fixed noise and t, and the two input sensitivities (issue 12's diagnostics).

* held-out FM loss: the flow-matching loss of generation samples never trained on;
* **prompt sensitivity** = held-out FM loss with the prompts shuffled across the samples minus
  with the true prompts: each image keeps its own noise z0 and time t, only its prompt changes;
* **image sensitivity** = held-out text loss of understanding samples with the images shuffled
  across the samples minus with the true images (each question and answer keeps its place).

A model that uses its input has both clearly above zero; one that ignores it has both ~0.

Fixed noise: batch ``b`` (samples ``b*batch_size`` ..) is scored with a fresh
``torch.Generator`` seeded ``seed + b``, from which :meth:`CheersModel.forward` draws z0 (N,C,S,S)
and t (N,); the shuffled pass has the same images per batch in the same slots, so the same z0 and
t. The shuffle is a derangement (no sample keeps its own prompt / image) drawn from ``seed``.
Samples are read in shard order with the kit's reader and encoded by the training path
(:class:`~cheers_pl.data.transforms.SampleEncoder`, CFG dropout off, then ``collate``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from cheers_pl.data.schema import Sample, SampleError, from_raw
from cheers_pl.data.shards import ShardError, expand_shards, read_shard
from cheers_pl.data.transforms import SampleEncoder, collate


def read_samples(folder: str | Path, task: str | None = None, limit: int | None = None) -> list[Sample]:
    """The samples of a shard folder (or any shard spec), in shard order; only ``task`` ones if given.

    Raises ``FileNotFoundError`` naming the folder when it holds no shard, ``ValueError`` naming
    the shard and sample for one that does not follow the schema.
    """
    try:
        urls = expand_shards([str(folder)])
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err} (held-out shards; `cheers data demo --out DIR` writes them)"
        ) from None
    out: list[Sample] = []
    for url in urls:
        try:
            for raw in read_shard(url):
                try:
                    sample = from_raw(raw)
                except SampleError as err:
                    raise ValueError(f"shard {url}: sample {raw.get('__key__')}: {err}") from None
                if task is None or sample.task == task:
                    out.append(sample)
                if limit is not None and len(out) >= limit:
                    return out
        except ShardError as err:
            raise ValueError(str(err)) from None
    return out


def derangement(n: int, seed: int = 0) -> list[int]:
    """A random permutation of range(n) with no fixed point (n >= 2; [0] for n == 1), from ``seed``."""
    rng = random.Random(seed)
    if n < 2:
        return list(range(n))
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


@dataclass
class Losses:
    """Token-mean text loss and image-mean FM loss over a set of samples, with their counts."""

    loss_fm: float
    loss_text: float
    gen_images: int
    text_tokens: int


def _device(model) -> torch.device:
    return model.placeholder_ids.device


@torch.no_grad()
def mean_losses(
    model,
    samples: list[Sample],
    batch_size: int = 8,
    seed: int = 0,
    text_from: list[int] | None = None,
    images_from: list[int] | None = None,
) -> Losses:
    """Losses of ``samples`` with fixed noise and t (see the module docstring); the model's mode is kept.

    Sample i is scored with the messages of sample ``text_from[i]`` and the images of sample
    ``images_from[i]`` (identity when None): the two must have the same task. FM: the mean over
    generation images; text: the mean over supervised tokens. NaN when there is none.
    """
    n = len(samples)
    if n == 0:
        raise ValueError("mean_losses: no samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    text_from = list(range(n)) if text_from is None else list(text_from)
    images_from = list(range(n)) if images_from is None else list(images_from)
    if len(text_from) != n or len(images_from) != n:
        raise ValueError(f"mean_losses: {n} samples but {len(text_from)} / {len(images_from)} pairings")
    encoder = SampleEncoder(model.processor, model.image_size, cfg_dropout=0.0)
    device = _device(model)
    fm_sum = text_sum = 0.0
    n_gen = n_text = 0
    for b, start in enumerate(range(0, n, batch_size)):
        items = []
        for i in range(start, min(start + batch_size, n)):
            text, image = samples[text_from[i]], samples[images_from[i]]
            if text.task != image.task:
                raise ValueError(
                    f"mean_losses: cannot pair {text.id} ({text.task}) with {image.id} ({image.task})"
                )
            items.append(
                encoder(Sample(samples[i].id, text.task, text.messages, image.images, samples[i].meta))
            )
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(model.processor, items).items()
        }
        out = model(batch, generator=torch.Generator(device=device).manual_seed(seed + b))
        fm_sum += float(out.loss_fm) * out.num_gen_images
        n_gen += out.num_gen_images
        if out.text_loss_rows is not None:
            text_sum += float(out.text_loss_rows.sum())
            n_text += int(out.text_count_rows.sum())
    nan = float("nan")
    return Losses(fm_sum / n_gen if n_gen else nan, text_sum / n_text if n_text else nan, n_gen, n_text)


def prompt_sensitivity(model, samples: list[Sample], batch_size: int = 8, seed: int = 0,
                       perm: list[int] | None = None) -> dict[str, float]:  # fmt: skip
    """``{"fm_heldout", "fm_shuffled_prompts", "prompt_sensitivity"}`` of generation ``samples``.

    ``perm``: which sample's prompt each image gets (default: a derangement from ``seed``).
    """
    gen = [s for s in samples if s.task == "generation"]
    if not gen:
        raise ValueError("prompt_sensitivity: no generation samples")
    perm = derangement(len(gen), seed) if perm is None else perm
    true = mean_losses(model, gen, batch_size, seed)
    shuffled = mean_losses(model, gen, batch_size, seed, text_from=perm)
    return {
        "fm_heldout": true.loss_fm,
        "fm_shuffled_prompts": shuffled.loss_fm,
        "prompt_sensitivity": shuffled.loss_fm - true.loss_fm,
    }


def image_sensitivity(model, samples: list[Sample], batch_size: int = 8, seed: int = 0,
                      perm: list[int] | None = None) -> dict[str, float]:  # fmt: skip
    """``{"text_heldout", "text_shuffled_images", "image_sensitivity"}`` of understanding ``samples``.

    ``perm``: which sample's image each question gets (default: a derangement from ``seed``).
    """
    und = [s for s in samples if s.task == "understanding"]
    if not und:
        raise ValueError("image_sensitivity: no understanding samples")
    perm = derangement(len(und), seed) if perm is None else perm
    true = mean_losses(model, und, batch_size, seed)
    shuffled = mean_losses(model, und, batch_size, seed, images_from=perm)
    return {
        "text_heldout": true.loss_text,
        "text_shuffled_images": shuffled.loss_text,
        "image_sensitivity": shuffled.loss_text - true.loss_text,
    }


def spread(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` of ``samples``, evenly spaced (every kind of a mixed folder keeps its share)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    step = len(samples) / limit
    return [samples[int(i * step)] for i in range(limit)]
