"""The training step reads no device value on the host (no host-device synchronisation).

On CPU there is no device queue to wait on, so the test records the aten operations that force
one on an accelerator: ``_local_scalar_dense`` (``.item()``, ``int()``, ``bool()``), ``nonzero``,
``masked_select`` and boolean-mask indexing, whose result size only the device knows. The
forward and backward of a batch carrying the loader's gather indices must run none of them.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cheers_pl.model import CheersModel
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec
from cheers_pl.stages.base import task_text_losses
from tests.helpers import randomize_zero_inits

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
INDEX_KEYS = ("image_positions", "gen_images", "text_positions", "text_rows")


class SyncSpy(TorchDispatchMode):
    """Records every dispatched op that would make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if func in SYNCING or bool_index:
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=["kit", "released"])
def model(request):
    torch.manual_seed(0)
    # the released dummy image and FM rule rewrite the batch on the host (cheers_pl.dummy_image);
    # the rest of compat released must not sync
    extra = {"dummy_image": "none", "fm_loss_images": "every_image"} if request.param == "released" else {}
    m = CheersModel(CheersSpec.tiny(compat=request.param, **extra))
    randomize_zero_inits(m)
    return m


def with_tasks(batch: dict) -> dict:
    batch = dict(batch)
    batch["tasks"] = ["understanding", "generation", "text"]
    batch["task_index"] = torch.tensor([0, 1, 2])
    batch["text_counts"] = (batch["labels"][:, 1:] != -100).sum(-1).tolist()
    return batch


def test_forward_backward_and_task_losses_never_sync(model):
    batch = with_tasks(mixed_batch(model))
    with SyncSpy() as spy:
        out = model(batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        task_text_losses(out, batch)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
    assert spy.hits == []
    assert out.num_gen_images == 1 and out.num_und_images == 1


def test_without_indices_the_step_finds_them_itself_and_agrees(model):
    batch = mixed_batch(model)
    bare = {k: v for k, v in batch.items() if k not in INDEX_KEYS}
    with SyncSpy() as spy:
        found = model(bare, generator=torch.Generator().manual_seed(0))
    assert spy.hits  # the fallback has to look at the device (this is what the indices avoid)
    given = model(batch, generator=torch.Generator().manual_seed(0))
    for name in ("loss", "loss_text", "loss_fm", "text_loss_rows"):
        torch.testing.assert_close(getattr(given, name), getattr(found, name), rtol=0, atol=0)


def test_task_losses_are_token_means_per_task(model):
    batch = with_tasks(mixed_batch(model))
    out = model(batch, generator=torch.Generator().manual_seed(0))
    losses = task_text_losses(out, batch)
    counts, sums = out.text_count_rows, out.text_loss_rows
    assert set(losses) == {t for t, n in zip(batch["tasks"], counts.tolist(), strict=True) if n > 0}
    for row, task in enumerate(batch["tasks"]):
        if task in losses:
            torch.testing.assert_close(losses[task], sums[row] / counts[row])
    bare = {k: v for k, v in batch.items() if k not in ("task_index", "text_counts")}
    assert task_text_losses(out, bare).keys() == losses.keys()


def test_indices_that_disagree_with_the_images_are_refused(model):
    batch = mixed_batch(model)
    batch["images"] = batch["images"][:1]
    with pytest.raises(ValueError, match="image placeholders .* but 1 images were given"):
        model(batch)
