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
    und = 3 * photos + 2 * 1000 + 600  # + 600 reading questions
    assert counts == {"understanding": und, "generation": photos + 1000, "text": 200}
    top = json.loads((out / "manifest.json").read_text())
    assert top["tasks"] == counts and top["samples"] == sum(counts.values()) and top["skipped"] == {}
    assert top["folders"] == {t: f"{t}/manifest.json" for t in demo.TASK_FOLDERS}
    assert verify_manifest(out)["ok"]
    held, held_samples = check_output(out / demo.HELDOUT)
    assert top["heldout"]["samples"] == len(held_samples) == 100 and set(held["tasks"]) == {"generation"}
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
    assert len(first["shards"]) == 79


def test_no_overwrite(built, capsys):
    assert cli.main(["demo", "--out", str(built[1]), "--digits", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(built[1]) in err and "--overwrite" in err
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
    name = module.__name__.split(".")[-1]
    assert err.value.code == 0 and f"usage: cheers data {name} " in capsys.readouterr().out


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


def test_reading_task_and_heldout_understanding(built):
    out = built[0]
    _, und = check_output(out / "understanding")
    reading = [s for s in und if s.id.startswith("reading-train-")]
    assert len(reading) == 600
    top = json.loads((out / "manifest.json").read_text())
    held_manifest, held = check_output(out / demo.HELDOUT_UND)
    assert set(held_manifest["tasks"]) == {"understanding"}
    assert top[demo.HELDOUT_UND] == {"manifest": f"{demo.HELDOUT_UND}/manifest.json", "samples": 200,
                                     "digits": 100, "reading": 100}  # fmt: skip
    digits = [s for s in held if s.id.startswith("digit-")]
    numbers = [s for s in held if s.id.startswith("reading-heldout-")]
    assert len(digits) == 100 and len(numbers) == 100
    assert {s.id.removesuffix("-qa") for s in digits} == {
        s.id for s in check_output(out / demo.HELDOUT)[1]
    }  # the same held-out digits as the generation ones
    assert not {s.id for s in held} & {s.id for s in und}
    for s in digits:
        assert s.messages[0]["content"] == "<image>\nWhat digit is this?"
        assert s.messages[1]["content"] == f"It is the digit {s.meta['label']}."
    counts = set()
    for s in reading + numbers:
        number = s.meta["number"]
        assert s.messages[0]["content"] == "<image>\nWhat number is written?"
        assert s.messages[1]["content"] == f"It is the number {number}."
        assert 2 <= len(number) <= 4 and number[0] != "0"
        counts.add(len(number))
        img, _ = decode_image(s.images[0])
        assert img.size == (64, 64) and np.asarray(img).max() >= 200  # white ink on black
    assert counts == {2, 3, 4}
    sizes = {s.meta["font_size"] for s in reading}
    assert min(sizes) >= 20 and len(sizes) > 10 and len({s.meta["stroke"] for s in reading}) == 3


def test_reading_images_stay_legible_at_32_px(built):
    """At the model's 32 px the digits stay apart and a template reader reads nearly all numbers."""
    from cheers_pl.data.images import resize_pad
    from cheers_pl.eval.number_reader import NumberReader

    _, held = check_output(built[0] / demo.HELDOUT_UND)
    numbers = [s for s in held if s.id.startswith("reading-")]
    images = np.stack(
        [np.asarray(resize_pad(decode_image(s.images[0])[0], 32).convert("L")) for s in numbers]
    )
    reader = NumberReader()
    read = reader.read(images / 255.0)
    assert [len(r) for r in read] == [len(s.meta["number"]) for s in numbers]  # segmentation exact
    exact = np.mean([r == s.meta["number"] for r, s in zip(read, numbers, strict=True)])
    assert exact >= 0.85


def test_judge_is_built_with_the_data(built):
    from cheers_pl.eval.judge import DigitJudge

    top = json.loads((built[0] / "manifest.json").read_text())
    entry = top["judge"]
    assert entry["file"] == demo.JUDGE and entry["train_count"] == 1000 and entry["heldout_count"] == 100
    assert entry["heldout_accuracy"] >= 0.95 and min(entry["heldout_accuracy_by_size"].values()) >= 0.95
    judges = [DigitJudge.load(out / demo.JUDGE) for out in built]
    assert np.array_equal(judges[0].support_vectors, judges[1].support_vectors)  # deterministic
    assert np.array_equal(judges[0].dual_coef, judges[1].dual_coef)


def test_reading_options(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["demo", "--out", str(out), "--digits", "20", "--texts", "2", "--heldout", "5"]
    args += ["--reading", "7", "--heldout-reading", "3", "--reading-min-digits", "3"]
    args += ["--reading-max-digits", "3", "--no-judge"]
    assert cli.main(args) == 0
    top = json.loads((out / "manifest.json").read_text())
    assert "judge" not in top and top[demo.HELDOUT_UND]["samples"] == 8
    _, held = check_output(out / demo.HELDOUT_UND)
    assert {len(s.meta["number"]) for s in held if "number" in s.meta} == {3}
    assert cli.main([*args[:3], "--reading-max-digits", "5", "--overwrite"]) == 1
    assert "--reading-max-digits 5" in capsys.readouterr().err
    assert cli.main([*args[:3], "--digits", "3", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["judge"]["file"] is None  # digits lack classes
