"""Two released training behaviours on kit batches: the dummy image, and the released FM positions.

Dummy image (``spec.dummy_image == "released"``): the release prepends an image to every row that
has none (its collator adds a black image at t = 0 to text-only samples), so that every vision
parameter is in the graph. Its T projected tokens come first in the row, attended causally like
text (not as a bidirectional image span), unsupervised, and its position ids shift the row's
text by T. :func:`add_dummy_images` rewrites a kit batch that way: T ``<image>`` placeholders in
front of each such row (the row still right-padded), a black image at that place in the reading
order of ``images``, and ``dummy_images`` (D,) naming them.

FM positions (``spec.fm_loss_images == "all"``, the released rule): every image is regressed, in
reading order; a generation image at its own T positions, and the one image of a row without a
generation image at that row's FIRST T positions (the release marks the T positions after each
supervised ``<im_start>``, else the row's first T). :func:`released_fm_positions` gives them.
"""

from __future__ import annotations

import torch
from torch import Tensor

INDEX_KEYS = ("image_positions", "gen_images", "text_positions", "text_rows")


def add_dummy_images(batch: dict, processor, image_size: int) -> dict:
    """``batch`` with a black dummy image prepended to every row without an image (module docstring).

    Input: a kit batch (``input_ids``, ``attention_mask``, ``labels`` (B, L), ``images`` (N,3,H,W)
    or absent; optional ``z0`` (N,C,S,S) and ``t`` (N,) for those images, ``dummy_z0`` (D,C,S,S)).
    Returns a new batch (B, L') with ``images`` (N + D, ...), ``dummy_images`` (D,) long, and ``z0``
    / ``t`` over all N + D images when given (a dummy's t is 0; its z0 is ``dummy_z0`` or drawn
    later). The loader's gather indices are dropped (recomputed for the new layout). A batch whose
    rows all have an image is returned as it is, with an empty ``dummy_images``.
    """
    ids, valid, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    placeholders = torch.tensor([processor.image_id, processor.image_gen_id], device=ids.device)
    is_image = torch.isin(ids, placeholders) & valid
    empty = ~is_image.any(1)
    images = batch.get("images")
    slots, given = int(is_image.sum()), 0 if images is None else images.shape[0]
    if slots != given * processor.tokens_per_image:
        raise ValueError(
            f"the batch has {slots} image placeholders ({slots / processor.tokens_per_image:g} images of "
            f"{processor.tokens_per_image} tokens) but {given} images were given"
        )
    out = {k: v for k, v in batch.items() if k not in INDEX_KEYS}
    device = ids.device
    if not bool(empty.any()):
        out["dummy_images"] = torch.zeros(0, dtype=torch.long, device=device)
        return out
    t_tok, lengths = processor.tokens_per_image, valid.sum(1)
    new_len = int((lengths + t_tok * empty).max())
    b = ids.shape[0]
    new_ids = torch.full((b, new_len), processor.pad_id, dtype=ids.dtype, device=device)
    new_valid = torch.zeros((b, new_len), dtype=torch.bool, device=device)
    new_labels = torch.full((b, new_len), -100, dtype=labels.dtype, device=device)
    order, dummy_index, real = [], [], 0  # reading order of the N + D images
    count = is_image.sum(1) // t_tok
    for row in range(b):
        keep = valid[row]
        row_ids, row_labels = ids[row][keep], labels[row][keep]
        if bool(empty[row]):
            dummy_index.append(len(order))
            order.append(-1)
            row_ids = torch.cat(
                [torch.full((t_tok,), processor.image_id, dtype=ids.dtype, device=device), row_ids]
            )
            row_labels = torch.cat(
                [torch.full((t_tok,), -100, dtype=labels.dtype, device=device), row_labels]
            )
        else:
            order += list(range(real, real + int(count[row])))
            real += int(count[row])
        n = row_ids.shape[0]
        new_ids[row, :n], new_labels[row, :n], new_valid[row, :n] = row_ids, row_labels, True
    size = (3, image_size, image_size)
    black = torch.zeros(size, device=device, dtype=images.dtype if images is not None else torch.float32)
    out.update(input_ids=new_ids, attention_mask=new_valid, labels=new_labels)
    out["images"] = torch.stack([black if i < 0 else images[i] for i in order])
    out["dummy_images"] = torch.tensor(dummy_index, dtype=torch.long, device=device)
    out["t"] = _merge(batch.get("t"), order, lambda: torch.zeros((), device=device))
    out["z0"] = _merge(batch.get("z0"), order, None, batch.get("dummy_z0"))
    return {k: v for k, v in out.items() if v is not None and k != "dummy_z0"}


def _merge(real: Tensor | None, order: list[int], dummy_value, dummies: Tensor | None = None):
    """Per-image values over the N + D images (``order``: -1 for a dummy), or None if not given."""
    if real is None:
        return None
    if dummies is None and dummy_value is None:
        raise ValueError(
            f"the batch gives z0 for its {real.shape[0]} images but not dummy_z0 for its "
            f"{order.count(-1)} dummy images"
        )
    rows, k = [], 0
    for i in order:
        if i >= 0:
            rows.append(real[i])
        else:
            rows.append(dummies[k] if dummies is not None else dummy_value().to(real))
            k += 1
    return torch.stack(rows)


def released_fm_positions(
    input_ids: Tensor, valid: Tensor, positions: Tensor, gen: Tensor, tokens_per_image: int
) -> Tensor:
    """Flat indices (N*T,) into B*L of the positions the released rule regresses each image at.

    ``positions`` (N*T,): the images' own placeholder positions in reading order; ``gen`` (G,):
    which images are generation images. Raises when a row without a generation image holds more
    than one image, or a row mixes understanding and generation images: the release has no rule
    for those (its FM step fails on them).
    """
    b, length = input_ids.shape
    t_tok = tokens_per_image
    n = positions.shape[0] // t_tok
    first = positions.view(n, t_tok)[:, 0]
    rows = first // length
    is_gen = torch.zeros(n, dtype=torch.bool, device=positions.device)
    is_gen[gen] = True
    start = valid.int().argmax(1)  # each row's first valid column
    out = positions.view(n, t_tok).clone()
    for row in rows.unique().tolist():
        mine = (rows == row).nonzero().squeeze(1)
        if bool(is_gen[mine].all()):
            continue
        if mine.numel() > 1:
            raise ValueError(
                f"fm_loss_images='all' (the released rule): row {row} has {mine.numel()} images, "
                f"{int(is_gen[mine].sum())} of them generation images; the release regresses a row "
                "without a generation image at its first T positions, which fits one image only"
            )
        out[mine[0]] = row * length + int(start[row]) + torch.arange(t_tok, device=positions.device)
    return out.reshape(-1)
