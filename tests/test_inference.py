"""cheers generate / answer / edit: outputs, repro cards, failures, and zero-shot editing."""

import hashlib
import json

import pytest
import torch
from PIL import Image

from cheers_pl import inference as inf
from cheers_pl.components.tokenizer import IMAGE
from cheers_pl.data.images import resize_pad, to_tensor
from cheers_pl.io.export import export_model
from tests.helpers import tiny_random_model

FAST = ["--steps", "3", "--cfg", "3.0", "--device", "cpu"]


@pytest.fixture(scope="module")
def model():
    return tiny_random_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_model(model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A wide and a tall PNG, a file that is not an image, and a path that does not exist."""
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for name, (w, h) in {"wide.png": (48, 24), "tall.png": (20, 40)}.items():
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_command_has_help(capsys):
    for main in (inf.main_generate, inf.main_answer, inf.main_edit):
        with pytest.raises(SystemExit) as err:
            main(["--help"])
        assert err.value.code == 0
        assert "--model" in capsys.readouterr().out


def test_generate_twice_gives_the_same_bytes_and_a_repro_card(model, exported, tmp_path):
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a photo of a cat"}, {"prompt": "a cup of coffee"}])
    args = ["--model", str(exported), "--jsonl", str(jsonl), "--num-images", "2", "--seed", "5", *FAST]
    for run in ("a", "b"):
        assert inf.main_generate([*args, "--out", str(tmp_path / run)]) == 0
    names = [f"{i:05d}_{k:02d}.png" for i in range(2) for k in range(2)]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    card = json.loads((tmp_path / "a" / "repro.json").read_text())
    s = card["settings"]
    assert (s["cfg_scale"], s["steps"], s["shift"], s["seed"], s["num_images"], s["size"]) == (
        3.0,
        3,
        0.5,
        5,
        2,
        32,
    )
    assert [(o["file"], o["seed"]) for o in card["outputs"]] == list(zip(names, [5, 6, 7, 8], strict=True))
    shard = exported / "model-00001-of-00001.safetensors"
    assert card["model"]["sha256"] == {shard.name: hashlib.sha256(shard.read_bytes()).hexdigest()}
    assert card["model"]["format"] == "exported" and card["versions"]["torch"] == torch.__version__
    assert card["command"].startswith("cheers generate --model ") and card["argv"][0] == "generate"
    # each image is the model's own sample from its recorded seed
    direct = model.generate(["a cup of coffee"], cfg_scale=3.0, steps=3, shift=0.5, seed=8).images[0]
    inf.save_png(direct, tmp_path / "direct.png")
    assert (tmp_path / "direct.png").read_bytes() == (tmp_path / "a" / "00001_01.png").read_bytes()


def test_generate_reports_failing_items_and_finishes_the_rest(exported, tmp_path, capsys):
    rows = [
        {"prompt": "a cat"},
        {"prompt": ""},
        "{not json",
        "",
        {"caption": "wrong field"},
        {"prompt": "a rocket"},
    ]
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    rc = inf.main_generate(
        ["--model", str(exported), "--jsonl", str(jsonl), "--out", str(out), "--save-gates", *FAST]
    )
    assert rc == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failures] == [1, 2, 4]
    assert "empty 'prompt'" in failures[0]["reason"] and "not JSON" in failures[1]["reason"]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_00.png", "00005_00.png"]
    assert len(list((out / "gates" / "00005_00").glob("*.png"))) == 3  # one map per step
    assert "2 of 5 items done, 3 failed" in capsys.readouterr().err
    assert json.loads((out / "repro.json").read_text())["settings"]["failures"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--prompt", "a cat", "--steps", "0"],
            "argument --steps: must be an integer in [1, 10000], got '0'",
        ),
        (["--prompt", "a cat", "--size", "30"], "--size 30 is not this model's image size 32"),
        (
            ["--prompt", "a cat", "--num-images", "0"],
            "argument --num-images: must be an integer in [1, 1000]",
        ),
        ([], "give --jsonl FILE or --prompt"),
        (["--jsonl", "EMPTY"], "no items"),
    ],
)
def test_generate_refuses_bad_settings(exported, tmp_path, capsys, extra, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    extra = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else a for a in extra]
    with pytest.raises(SystemExit) as err:
        inf.main_generate(["--model", str(exported), "--out", str(tmp_path / "o"), "--device", "cpu", *extra])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_generate_size_of_the_model_is_fine_and_a_missing_model_is_named(exported, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert (
        inf.main_generate(
            ["--model", str(exported), "--prompt", "a cat", "--size", "32", "--out", out, *FAST]
        )
        == 0
    )
    with pytest.raises(SystemExit) as err:
        inf.main_generate(["--model", str(tmp_path / "nowhere"), "--prompt", "a cat", "--out", out + "2"])
    assert err.value.code == 2 and "nowhere" in capsys.readouterr().err


def test_answer_jsonl_writes_answers_and_reports_unreadable_images(model, exported, photos, tmp_path, capsys):
    rows = [
        {"image": "wide.png", "question": "What is in the picture?"},
        {"image": "broken.png", "question": "?"},
        {"image": "missing.png", "question": "?"},
        {"image": str(photos / "tall.png"), "question": "How many?"},
    ]
    jsonl = write_jsonl(photos / "q.jsonl", rows)  # relative paths are from the JSONL's folder
    out = tmp_path / "out"
    rc = inf.main_answer(
        [
            "--model",
            str(exported),
            "--jsonl",
            str(jsonl),
            "--out",
            str(out),
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
        ]
    )
    assert rc == 1
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["index"] for a in answers] == [0, 3]
    for record, (name, question) in zip(
        answers, [("wide.png", rows[0]["question"]), ("tall.png", "How many?")], strict=True
    ):
        pixels = to_tensor(resize_pad(Image.open(photos / name).convert("RGB"), model.image_size))[None]
        assert record["question"] == question
        assert record["answer"] == model.answer(pixels, [question], 5)[0]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failures] == [1, 2]
    assert "broken.png" in failures[0]["reason"] and "missing.png" in failures[1]["reason"]
    assert "[0] " in capsys.readouterr().out
    assert json.loads((out / "repro.json").read_text())["settings"]["do_sample"] is False


def test_answer_single_values_and_sampling_is_seeded(exported, photos, tmp_path):
    args = [
        "--model",
        str(exported),
        "--image",
        str(photos / "wide.png"),
        "--question",
        "What?",
        "--sample",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    ]
    for run in ("a", "b"):
        assert inf.main_answer([*args, "--out", str(tmp_path / run)]) == 0
    a, b = ((tmp_path / r / "answers.jsonl").read_text() for r in ("a", "b"))
    assert a == b and len(a.splitlines()) == 1


def test_edit_schedule_starts_at_t0_and_runs_the_remaining_steps():
    t, dt = inf.edit_schedule(80, shift=0.5, t0=0.1, last_dt="exact")
    assert len(t) == 72 and float(t[0]) == pytest.approx(0.1) and float(dt.sum()) == pytest.approx(0.9)
    t, _ = inf.edit_schedule(80, shift=0.5, t0=0.1)
    assert float(t[-1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        inf.edit_schedule(0)


def test_edit_prompt_holds_the_source_and_the_null_row_keeps_it(model):
    p, n = model.processor, model.tokens_per_image
    batch = inf.edit_rows(model, ["make it blue"], cfg=True)
    cond, null = batch["input_ids"]
    for row in (cond, null):
        assert int((row == p.image_id).sum()) == n and int((row == p.image_gen_id).sum()) == n
        assert (row[-n:] == p.image_gen_id).all()
    assert torch.equal(cond == p.image_id, null == p.image_id) and (null == p.null_id).any()
    with pytest.raises(ValueError, match="image marker"):
        inf.edit_rows(model, [IMAGE + " again"], cfg=False)


def test_edit_shapes_determinism_source_and_step_count(model):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, model.image_size, model.image_size, generator=g)
    calls = []
    hook = model.cfm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = inf.edit(model, images, ["make it blue", "add a hat"], steps=10, cfg_scale=3.0, seed=1)
    finally:
        hook.remove()
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert len(calls) == round(0.9 * 10)
    again = inf.edit(model, images, ["make it blue", "add a hat"], steps=10, cfg_scale=3.0, seed=1)
    assert torch.equal(out, again)
    reference = inf.edit(
        model, images, ["make it blue", "add a hat"], steps=10, cfg_scale=3.0, seed=1, use_cache=False
    )
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    perturbed = images.clone()
    perturbed[0] = 1 - perturbed[0]
    moved = inf.edit(model, perturbed, ["make it blue", "add a hat"], steps=10, cfg_scale=3.0, seed=1)
    assert not torch.allclose(moved[0], out[0], atol=1e-3)
    assert not torch.equal(
        out, inf.edit(model, images, ["make it blue", "add a hat"], steps=10, cfg_scale=3.0, seed=2)
    )


def test_edit_command_writes_images_and_a_card(model, exported, photos, tmp_path):
    jsonl = write_jsonl(
        tmp_path / "e.jsonl",
        [
            {"image": str(photos / "wide.png"), "instruction": "make it blue"},
            {"image": str(photos / "broken.png"), "instruction": "x"},
        ],
    )
    out = tmp_path / "out"
    assert inf.main_edit(["--model", str(exported), "--jsonl", str(jsonl), "--out", str(out), *FAST]) == 1
    assert Image.open(out / "00000.png").size == (model.image_size, model.image_size)
    card = json.loads((out / "repro.json").read_text())
    assert card["settings"]["steps_run"] == 3 and card["settings"]["t0"] == 0.1
    assert [o["file"] for o in card["outputs"]] == ["00000.png"]
    with pytest.raises(SystemExit) as err:
        inf.main_edit(["--model", str(exported), "--jsonl", str(jsonl), "--out", str(out), "--steps", "0"])
    assert err.value.code == 2


# -- issue 14: bad numbers and --out folders are refused in one line; no earlier run is overwritten ------
MAINS = {"generate": inf.main_generate, "answer": inf.main_answer, "edit": inf.main_edit}
ITEM = {"generate": ["--prompt", "a cat"], "answer": ["--question", "?"], "edit": ["--instruction", "x"]}


@pytest.mark.parametrize(
    "command, option, value, interval",
    [
        ("generate", "--cfg", "nan", "[0, 100]"),
        ("generate", "--cfg", "inf", "[0, 100]"),
        ("generate", "--cfg", "-1", "[0, 100]"),
        ("generate", "--shift", "inf", "(0, 100]"),
        ("generate", "--shift", "nan", "(0, 100]"),
        ("generate", "--shift", "0", "(0, 100]"),
        ("generate", "--steps", "1e9", "[1, 10000]"),
        ("generate", "--seed", "-1", "[0, "),
        ("edit", "--cfg", "nan", "[0, 100]"),
        ("edit", "--shift", "-inf", "(0, 100]"),
        ("edit", "--t0", "nan", "[0, 1)"),
        ("edit", "--t0", "1", "[0, 1)"),
        ("answer", "--temperature", "nan", "(0, 100]"),
        ("answer", "--temperature", "0", "(0, 100]"),
        ("answer", "--top-p", "1.5", "(0, 1]"),
        ("answer", "--top-p", "nan", "(0, 1]"),
        ("answer", "--top-k", "-1", "[0, "),
        ("answer", "--max-new-tokens", "0", "[1, 65536]"),
    ],
)
def test_non_finite_or_out_of_range_numbers_are_refused_at_parse_time(
    tmp_path, capsys, command, option, value, interval
):
    extra = ["--image", str(tmp_path / "x.png")] if command != "generate" else []
    argv = ["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *ITEM[command], *extra]
    with pytest.raises(SystemExit) as err:
        MAINS[command]([*argv, f"{option}={value}"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 2 and f"argument {option}" in line and interval in line and repr(value) in line
    assert not (tmp_path / "o").exists()  # refused before anything was written or loaded


@pytest.mark.parametrize("command", list(MAINS))
def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys, command):
    (tmp_path / "file").write_text("")
    extra = ["--image", str(tmp_path / "x.png")] if command != "generate" else []
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        argv = ["--model", str(tmp_path / "nowhere"), "--out", str(out), *ITEM[command], *extra]
        with pytest.raises(SystemExit) as err:
            MAINS[command](argv)
        text = capsys.readouterr().err.strip()
        assert (
            err.value.code == 2
            and len(text.splitlines()) == 1
            and "--out" in text
            and "Traceback" not in text
        )
        assert "is a file" in text or "Not a directory" in text


def test_answer_refuses_to_overwrite_an_earlier_answers_file(exported, photos, tmp_path, capsys):
    args = ["--model", str(exported), "--image", str(photos / "wide.png"), "--question", "What?"]
    args += ["--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "o")]
    assert inf.main_answer(args) == 0
    first = (tmp_path / "o" / "answers.jsonl").read_text()
    with pytest.raises(SystemExit) as err:
        inf.main_answer([*args[:3], str(photos / "tall.png"), *args[4:]])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 2 and "answers.jsonl" in line and "--overwrite" in line
    assert (tmp_path / "o" / "answers.jsonl").read_text() == first  # untouched
    assert inf.main_answer([*args[:3], str(photos / "tall.png"), *args[4:], "--overwrite"]) == 0
    assert "tall.png" in (tmp_path / "o" / "answers.jsonl").read_text()


def test_generate_refuses_to_overwrite_earlier_images(exported, tmp_path, capsys):
    args = [
        "--model",
        str(exported),
        "--prompt",
        "a cat",
        *FAST,
        "--steps",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    assert inf.main_generate(args) == 0
    with pytest.raises(SystemExit) as err:
        inf.main_generate(args)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 2 and "00000_00.png" in line and "repro.json" in line and "--overwrite" in line
    assert inf.main_generate([*args, "--overwrite"]) == 0


def test_plain_gives_the_fast_paths_images_and_reaches_the_model(exported, tmp_path, monkeypatch):
    """``--plain`` (model.fast = False) and the default fast path write the same images (8-bit PNGs
    of outputs within 1e-5); the flag reaches the loaded model's VAE and D."""
    seen = []
    load = inf._load

    def spy(parser, args):
        m = load(parser, args)
        seen.append((m.fast, m.vae.fast, m.pixel_decoder.fast, m.compile_decoders))
        return m

    monkeypatch.setattr(inf, "_load", spy)
    outs = []
    for extra in ([], ["--plain"]):
        out = tmp_path / ("plain" if extra else "fast")
        args = ["--model", str(exported), "--prompt", "a cat", "--out", str(out), *FAST, *extra]
        assert inf.main_generate(args) == 0
        outs.append((out / "00000_00.png").read_bytes())
    assert seen == [(True, True, True, False), (False, False, False, False)]
    assert outs[0] == outs[1]
