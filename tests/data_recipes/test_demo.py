"""The demo recipe: three task folders of real images and chats, deterministic, and the CLI."""

import json

import numpy as np
import pytest

from cheers_pl.data.images import decode_image
from data_recipes import captions, cli, demo, imagefolder, llava, text
from data_recipes.writer import verify_manifest
from tests.data_recipes.util import check_output, write_jsonl


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two runs of the demo into two folders."""
    outs = [tmp_path_factory.mktemp("demo") / "out" for _ in range(2)]
    for out in outs:
        assert cli.main(["demo", "--out", str(out)]) == 0
    return outs


def test_three_task_folders(built):
    out = built[0]
    counts = {}
    for task in demo.TASK_FOLDERS:
        manifest, samples = check_output(out / task)
        assert set(manifest["tasks"]) == {task}
        assert len(manifest["shards"]) > 1  # --maxcount 50 by default
        counts[task] = len(samples)
    photos = len(demo.PHOTOS)
    assert counts == {"understanding": 3 * photos + 2 * 300, "generation": photos + 300, "text": 200}
    top = json.loads((out / "manifest.json").read_text())
    assert top["tasks"] == counts and top["samples"] == sum(counts.values()) and top["skipped"] == {}
    assert top["folders"] == {t: f"{t}/manifest.json" for t in demo.TASK_FOLDERS}
    assert verify_manifest(out)["ok"]
    held, held_samples = check_output(out / demo.HELDOUT)
    assert top["heldout"]["samples"] == len(held_samples) == 40 and set(held["tasks"]) == {"generation"}
    train_ids = {s.id for s in check_output(out / "generation")[1]}
    assert not train_ids & {s.id for s in held_samples}  # held-out digits are never trained on


def test_real_images(built):
    _, samples = check_output(built[0] / "generation")
    by_id = {s.id: s for s in samples}
    digit, _ = decode_image(by_id["digit-0007"].images[0])
    pixels = np.asarray(digit)
    assert digit.size == (64, 64) and pixels.std() > 20 and pixels.min() == 0 and pixels.max() > 200
    assert (pixels[::8, ::8] == pixels[7::8, 7::8]).all()  # nearest-neighbour 8x upscale
    assert by_id["digit-0007"].messages[0]["content"] == "a handwritten digit 7 in white on black"
    cat, _ = decode_image(by_id["photo-chelsea"].images[0])
    assert min(cat.size) == 128 and np.asarray(cat).std() > 20
    assert by_id["photo-chelsea"].messages[0]["content"] == "a photo of a tabby cat"
    _, understanding = check_output(built[0] / "understanding")
    answers = {s.id: s.messages[1]["content"] for s in understanding}
    assert answers["digit-0007-qa"] == "It is the digit 7."
    assert answers["digit-0007-describe"] == "A handwritten digit 7 in white on black."
    assert answers["photo-camera-colour"] == "No, it is a grayscale image."


def test_deterministic(built):
    first, second = (json.loads((out / "manifest.json").read_text()) for out in built)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    assert len(first["shards"]) == 25


def test_no_overwrite(built):
    with pytest.raises(FileExistsError, match=str(built[1])):
        cli.main(["demo", "--out", str(built[1]), "--digits", "3"])
    assert cli.main(["demo", "--out", str(built[1]), "--digits", "3", "--texts", "5", "--overwrite"]) == 0
    assert json.loads((built[1] / "manifest.json").read_text())["tasks"]["text"] == 5
    assert verify_manifest(built[1] / "understanding")["ok"]


@pytest.mark.parametrize("name", list(cli.RECIPES))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main([name, "--help"])
    assert err.value.code == 0 and "--out" in capsys.readouterr().out


@pytest.mark.parametrize("module", [demo, llava, captions, imagefolder, text])
def test_module_main_help(module, capsys):
    with pytest.raises(SystemExit) as err:
        module.main(["--help"])
    assert err.value.code == 0 and f"data_recipes.{module.__name__.split('.')[-1]}" in capsys.readouterr().out


def test_cli_prints_a_summary(tmp_path, capsys):
    rows = [
        '{"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        "{",
    ]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    assert cli.main(["text", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert (
        "wrote 1 samples (text 1)" in out
        and "bad_json 1" in out
        and str(tmp_path / "out" / "manifest.json") in out
    )
