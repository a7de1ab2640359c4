"""`make demo` end to end at a reduced step count: logs, previews, gate stats, checkpoint, image."""

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cheers_pl.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    report = run_demo(str(root / "runs"), str(root / "data"), stage1_steps=12, stage2_steps=24, vae_steps=40,
                      preview_every=12)  # fmt: skip
    return root / "runs", report


def events(run):
    acc = EventAccumulator(
        str(sorted(run.glob("tb/version_*"))[-1]), size_guidance={"scalars": 0, "images": 0}
    )
    acc.Reload()
    return acc


def test_demo_leaves_logs_previews_checkpoint_and_image(demo):
    runs, report = demo
    assert Image.open(report["image"]).size[0] > 32
    for stage in ("stage1", "stage2"):
        acc = events(runs / stage)
        scalars = set(acc.Tags()["scalars"])
        assert {"train/loss", "train/loss_fm", "train/loss_text", "hfi/gate_abs_mean"} <= scalars, scalars
        assert {"previews/generated", "previews/reconstruction"} <= set(acc.Tags()["images"])
        assert (runs / stage / "checkpoints" / "last.ckpt").is_file()
        assert any((runs / stage / "previews").glob("generated_step*.png"))
    assert report["checkpoint"].endswith("stage2/checkpoints/last.ckpt")


def test_demo_loss_falls(demo):
    runs, _ = demo
    loss = [e.value for e in events(runs / "stage2").Scalars("train/loss")]
    assert loss[-1] < loss[0]
