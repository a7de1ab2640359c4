"""Token batches in the released layout -> the kit's batch format.

The release writes one id per image in its token sequences, ``-200`` for an understanding image and
``-300`` for a generation image, and expands each into the image's T projected tokens inside the
model. The kit's sequences hold the T placeholders themselves (``<image>`` / ``<image_gen>`` ids),
so a released batch is expanded before it reaches :class:`~cheers_pl.model.CheersModel`::

    released  ... <im_start> -200 <im_end> ...         (L)
    kit       ... <im_start> <image>*T <im_end> ...    (L + (T - 1) per image)

Labels: an image's label becomes T x -100. The released forward inserts -100 after each supervised
``<im_start>`` and drops the supervised ``<im_end>`` (so after a generated image ``<im_end>`` is
not learnt); for well-formed spans that is the kit's labelling with ``<im_end>`` unsupervised, which
is what :func:`expand_released_batch` writes.
"""

from __future__ import annotations

import torch
from torch import Tensor

RELEASED_IMAGE, RELEASED_IMAGE_GEN = -200, -300


def expand_released_ids(ids: Tensor, processor) -> Tensor:
    """One released row (L,) -> the kit's row (L'), each -200 / -300 as T placeholders."""
    t_tok, parts = processor.tokens_per_image, []
    for tok in ids.tolist():
        if tok == RELEASED_IMAGE:
            parts += [processor.image_id] * t_tok
        elif tok == RELEASED_IMAGE_GEN:
            parts += [processor.image_gen_id] * t_tok
        else:
            parts.append(tok)
    return torch.tensor(parts, dtype=torch.long)


def _expand_labels(ids: Tensor, labels: Tensor, processor) -> Tensor:
    t_tok, out = processor.tokens_per_image, []
    for tok, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        if tok in (RELEASED_IMAGE, RELEASED_IMAGE_GEN):
            out += [-100] * t_tok
        else:
            out.append(-100 if lab == processor.im_end_id else lab)
    return torch.tensor(out, dtype=torch.long)


def expand_released_batch(
    input_ids: Tensor,
    processor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """A released batch (B, L) -> a kit batch (B, L'): ``input_ids``, ``attention_mask``, ``labels``.

    Padding (``attention_mask`` 0) is dropped and the rows padded again on ``padding_side``;
    ``labels`` default to -100 everywhere.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if labels is None:
        labels = torch.full_like(input_ids, -100)
    rows = []
    for ids, keep, lab in zip(input_ids, attention_mask.bool(), labels, strict=True):
        rows.append(
            {
                "input_ids": expand_released_ids(ids[keep], processor),
                "labels": _expand_labels(ids[keep], lab[keep], processor),
            }
        )
    return processor.collate(rows, padding_side=padding_side)
