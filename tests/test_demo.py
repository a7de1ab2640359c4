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


def test_demo_evaluates_and_logs_the_sensitivities(demo):
    import json

    import torch

    runs, report = demo
    result = json.loads((runs / "eval" / "eval.json").read_text())
    assert report["eval"] == str(runs / "eval" / "eval.md") and result["t2i_images"] == 200
    assert {"t2i_acc", "read_digit_acc", "prompt_sensitivity", "image_sensitivity"} <= set(result)
    scalars = set(events(runs / "stage2").Tags()["scalars"])
    assert {"eval/prompt_sensitivity", "eval/image_sensitivity", "eval/t2i_acc"} <= scalars, scalars
    ckpt = torch.load(runs / "stage2" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert "current_model_state" in ckpt  # stage II's EMA: the checkpoint's state_dict is the average


def test_demo_loss_falls(demo):
    runs, _ = demo
    # the text loss: at 24 steps the FM term (weighted 10 in the tiny overlay) is still one batch's t
    loss = [e.value for e in events(runs / "stage2").Scalars("train/loss_text")]
    assert loss[-1] < loss[0]


def test_the_demo_model_generates_answers_and_edits_through_the_commands(demo, tmp_path):
    from torchvision.utils import save_image

    from cheers_pl.cli import main
    from cheers_pl.smoke import photo

    _, report = demo
    ckpt = report["checkpoint"]
    save_image(photo("chelsea", 48), tmp_path / "cat.png")
    common = ["--model", ckpt, "--steps", "4", "--cfg", "3", "--shift", "1"]
    assert main(["generate", *common, "--prompt", "a handwritten digit 3", "--out", str(tmp_path / "g")]) == 0
    assert main(["edit", *common, "--image", str(tmp_path / "cat.png"), "--instruction", "make it a digit",
                 "--out", str(tmp_path / "e")]) == 0  # fmt: skip
    assert main(["answer", "--model", ckpt, "--image", str(tmp_path / "cat.png"), "--question", "What is it?",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    assert (tmp_path / "g" / "00000_00.png").is_file() and (tmp_path / "e" / "00000.png").is_file()
    assert (tmp_path / "a" / "answers.jsonl").read_text().strip()
