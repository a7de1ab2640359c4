"""Done-when of the data issue: `cheers data demo` shards stream into model-ready mixed batches."""

from collections import Counter

import pytest
import torch

from cheers_pl.cli import main
from cheers_pl.data.datamodule import CheersDataModule
from cheers_pl.model import CheersModel
from cheers_pl.spec import CheersSpec


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["data", "demo", "--out", str(out), "--digits", "60", "--texts", "40"]) == 0
    return out


def test_demo_shards_stream_into_model_ready_batches_at_3_6_1(demo):
    model = CheersModel(CheersSpec.tiny())
    tasks = {
        t: {"shards": [str(demo / t)], "ratio": r}
        for t, r in (("understanding", 3), ("generation", 6), ("text", 1))
    }
    dm = CheersDataModule(tasks, batch_size=8, shuffle_buffer=50, num_workers=2)
    dm.attach(model.processor, model.image_size).setup()
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(40)]
    counts = Counter(t for b in batches for t in b["tasks"])
    assert abs(counts["generation"] / 320 - 0.6) < 0.11 and abs(counts["text"] / 320 - 0.1) < 0.06
    out = model(batches[0])
    assert torch.isfinite(out.loss) and out.loss_text > 0
    stats = dm.data_stats()
    assert not [k for k in stats if k.startswith(("skipped/", "shard_error"))], stats  # the demo set is clean
    assert not stats  # grayscale digits are converted to RGB exactly: not counted as a repair
