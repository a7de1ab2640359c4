"""Session fixtures of the LoRA tests: an own-data set (recipes) and two tiny base models (exported)."""

from __future__ import annotations

import pytest

from cheers_pl.io.export import export_model
from tests.finetune.helpers import own_photos, own_shards
from tests.helpers import randomize_zero_inits


def _base(folder, seed: int):
    import torch

    from cheers_pl.model import CheersModel
    from cheers_pl.spec import CheersSpec

    torch.manual_seed(seed)
    model = CheersModel(CheersSpec.tiny())
    randomize_zero_inits(model, seed=seed)  # a "trained" base: the head's zero layers are not zero
    export_model(model, folder)
    return folder


@pytest.fixture(scope="session")
def own_data(tmp_path_factory):
    """(raw folder: photos/, captions.jsonl, chats.jsonl; shards folder: generation/, understanding/)."""
    raw = own_photos(tmp_path_factory.mktemp("own_raw"))
    return raw, own_shards(raw, tmp_path_factory.mktemp("own_shards"))


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny base model as an exported folder (``cheers export``'s layout)."""
    return _base(tmp_path_factory.mktemp("base") / "model", seed=0)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory):
    """Another tiny base (other weights, same spec)."""
    return _base(tmp_path_factory.mktemp("other_base") / "model", seed=1)
