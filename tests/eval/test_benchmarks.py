"""GenEval / DPG-Bench generation layouts and the VLMEvalKit wrapper, on the tiny model."""

import json
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cheers_pl import smoke
from cheers_pl.eval import dpg, geneval, vlmeval
from cheers_pl.eval.dpg import grid_boxes, run_dpg
from cheers_pl.eval.geneval import load_geneval_metadata, run_geneval, sample_images, to_uint8
from cheers_pl.eval.vlmeval import CheersVLM
from cheers_pl.model import CheersModel
from cheers_pl.spec import CheersSpec
from tests.helpers import randomize_zero_inits

DATA = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
GENEVAL_META = DATA / "geneval" / "evaluation_metadata.jsonl"
DPG_PROMPTS = DATA / "dpg" / "prompts"
FAST = dict(cfg_scale=9.5, steps=1, shift=1.0, seed=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CheersModel(CheersSpec.tiny())
    randomize_zero_inits(m)
    return m.eval()


@pytest.fixture(scope="module")
def geneval_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("geneval") / "out"
    card = run_geneval(model, GENEVAL_META, out, images_per_prompt=4, batch_size=4, progress=False, **FAST)
    return out, card


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class NoGenerate:
    """A model stand-in that fails if anything is generated."""

    image_size = 32

    def generate(self, *a, **k):
        raise AssertionError("generated before the inputs were checked")


# -- GenEval ----------------------------------------------------------------------------------
def test_geneval_layout(geneval_run, model):
    out, card = geneval_run
    lines = GENEVAL_META.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [f"{i:05d}" for i in range(6)]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["run.json"]
    for i, line in enumerate(lines):
        folder = out / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text(encoding="utf-8") == line + "\n"
        with open(folder / "metadata.jsonl") as fp:  # what GenEval's scorer does
            assert json.load(fp) == json.loads(line)
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.jsonl", "samples"]
        names = sorted(p.name for p in (folder / "samples").iterdir())
        assert names == ["0000.png", "0001.png", "0002.png", "0003.png"]
        for name in names:
            with Image.open(folder / "samples" / name) as img:
                assert img.format == "PNG" and img.mode == "RGB" and img.size == (model.image_size,) * 2
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["benchmark"] == "geneval"
    assert on_disk["settings"]["steps"] == 1 and on_disk["settings"]["images_per_prompt"] == 4
    assert on_disk["counts"]["generated_images"] == 24 and set(on_disk["chunk_seeds"]) == set(folders)
    # the four samples of a prompt differ, and prompts differ
    s = [pixels(out / "00000" / "samples" / f"{k:04d}.png") for k in range(4)]
    assert not np.array_equal(s[0], s[1])
    assert not np.array_equal(s[0], pixels(out / "00001" / "samples" / "0000.png"))


def test_geneval_images_are_the_sampling_function(geneval_run, model):
    out, _ = geneval_run
    prompts = load_geneval_metadata(GENEVAL_META)
    p = prompts[4]
    imgs = sample_images(model, p.prompt, f"{p.index:05d}", 4, batch_size=4, **FAST)
    for k in range(4):
        assert np.array_equal(to_uint8(imgs[k]), pixels(out / "00004" / "samples" / f"{k:04d}.png"))


def test_geneval_deterministic_and_limit(geneval_run, model, tmp_path):
    out, _ = geneval_run
    again = tmp_path / "again"
    run_geneval(model, GENEVAL_META, again, progress=False, **FAST)
    assert png_bytes(again) == png_bytes(out)
    part = tmp_path / "part"
    card = run_geneval(model, GENEVAL_META, part, limit=2, progress=False, **FAST)
    assert sorted(p.name for p in part.iterdir() if p.is_dir()) == ["00000", "00001"]
    assert card["counts"] == {
        "prompts_in_source": 6,
        "selected": 2,
        "generated_images": 8,
        "skipped_prompts": 0,
    }
    full = png_bytes(out)
    assert png_bytes(part) == {k: v for k, v in full.items() if k.startswith(("00000", "00001"))}


def test_geneval_skips_existing_and_resumes(geneval_run, model, tmp_path):
    src, _ = geneval_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = png_bytes(out)
    card = run_geneval(model, GENEVAL_META, out, progress=False, **FAST)
    assert card["counts"]["generated_images"] == 0 and card["counts"]["skipped_prompts"] == 6
    # a missing sample: only its chunk is regenerated, to the same bytes
    (out / "00003" / "samples" / "0002.png").unlink()
    card = run_geneval(model, GENEVAL_META, out, progress=False, **FAST)
    assert card["counts"]["generated_images"] == 4 and card["counts"]["skipped_prompts"] == 5
    assert png_bytes(out) == before
    # other settings into the same folder: refused, nothing touched
    with pytest.raises(ValueError, match="steps=1 .now 2"):
        run_geneval(model, GENEVAL_META, out, progress=False, **{**FAST, "steps": 2})
    # overwrite regenerates everything (same settings -> same bytes) and drops stale extra samples
    shutil.copy(out / "00000" / "samples" / "0000.png", out / "00000" / "samples" / "0007.png")
    card = run_geneval(model, GENEVAL_META, out, overwrite=True, progress=False, **FAST)
    assert card["counts"]["generated_images"] == 24
    assert png_bytes(out) == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # overwrite with other settings but only part of the prompts: warned, the rest is stale
    with pytest.warns(UserWarning, match="beyond the limit keep the old images"):
        run_geneval(model, GENEVAL_META, out, overwrite=True, limit=1, progress=False, **{**FAST, "seed": 1})


def test_geneval_batch_size_one_gives_each_image_its_seed(model, tmp_path):
    card = run_geneval(
        model, GENEVAL_META, tmp_path, images_per_prompt=2, batch_size=1, limit=1, progress=False, **FAST
    )
    seeds = card["chunk_seeds"]["00000"]
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    one = model.generate(
        ["a photo of a bench"], seed=seeds[1], **{k: FAST[k] for k in ("cfg_scale", "steps", "shift")}
    )
    assert np.array_equal(to_uint8(one.images[0]), pixels(tmp_path / "00000" / "samples" / "0001.png"))


def test_geneval_bad_inputs(tmp_path):
    m, out = NoGenerate(), tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="not found"):
        run_geneval(m, tmp_path / "missing.jsonl", out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        run_geneval(m, empty, out)
    lines = GENEVAL_META.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1], '{"tag": "counting", "prompt": ', lines[3]]) + "\n")
    with pytest.raises(ValueError, match="line 3: bad JSON"):
        run_geneval(m, bad, out)
    bad.write_text("\n".join([lines[0], '{"tag": "counting"}']) + "\n")
    with pytest.raises(ValueError, match="line 2: no non-empty string 'prompt'"):
        run_geneval(m, bad, out)
    bad.write_text("\n".join([lines[0], "", lines[1]]) + "\n")
    with pytest.raises(ValueError, match="line 2: blank line"):
        run_geneval(m, bad, out)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        run_geneval(m, GENEVAL_META, out, steps=0)
    with pytest.raises(ValueError, match="images_per_prompt"):
        run_geneval(m, GENEVAL_META, out, images_per_prompt=0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        run_geneval(m, GENEVAL_META, out, seed=0.5)
    assert not out.exists()


# -- DPG-Bench --------------------------------------------------------------------------------
def test_dpg_grid_layout(model, tmp_path):
    r = model.image_size
    card = run_dpg(model, DPG_PROMPTS, tmp_path, progress=False, **FAST)
    ids = sorted(p.stem for p in DPG_PROMPTS.glob("*.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{i}.png" for i in ids] + ["run.json"])
    assert card["counts"]["generated_grids"] == 3 and card["skipped"] == {}
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["resolution"] == r
    for pid in ids:
        prompt = (DPG_PROMPTS / f"{pid}.txt").read_text().strip()
        want = sample_images(model, prompt, pid, 4, batch_size=4, **FAST)
        with Image.open(tmp_path / f"{pid}.png") as grid:
            assert grid.size == (2 * r, 2 * r) and grid.mode == "RGB"
            boxes = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
            assert grid_boxes(r) == boxes
            for k, box in enumerate(boxes):  # DPG-Bench's crops
                assert np.array_equal(np.asarray(grid.crop(box)), to_uint8(want[k])), (pid, k)
    # rerun keeps the grids; the same run elsewhere gives the same bytes
    again = run_dpg(model, DPG_PROMPTS, tmp_path, progress=False, **FAST)
    assert again["counts"]["kept_existing"] == 3 and again["counts"]["generated_grids"] == 0


def test_dpg_empty_prompt_skipped_and_bad_inputs(model, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("countbench1.txt", "0.txt"):
        shutil.copy(DPG_PROMPTS / name, prompts / name)
    (prompts / "empty7.txt").write_text("  \n")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"empty7\.txt \(empty prompt file\)"):
        card = run_dpg(model, prompts, out, limit=None, progress=False, **FAST)
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "countbench1.png"]
    assert card["skipped"] == {"empty7": "empty prompt file"}
    assert json.loads((out / "run.json").read_text())["skipped"] == {"empty7": "empty prompt file"}

    m = NoGenerate()
    with pytest.raises(ValueError, match="images_per_prompt=2"):
        run_dpg(m, DPG_PROMPTS, tmp_path / "x", images_per_prompt=2)
    with pytest.raises(FileNotFoundError):
        run_dpg(m, tmp_path / "nope", tmp_path / "x")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no <id>.txt prompt files"):
        run_dpg(m, tmp_path / "none", tmp_path / "x")
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        run_dpg(m, DPG_PROMPTS, tmp_path / "x", steps=0)
    assert not (tmp_path / "x").exists()


# -- CLI entry points -------------------------------------------------------------------------
@pytest.mark.parametrize("mod", [geneval, dpg, vlmeval])
def test_main_help(mod, capsys):
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_main_checks_inputs_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{oops\n')
    with pytest.raises(SystemExit) as exc:
        geneval.main(
            ["--model", str(tmp_path / "no-model"), "--metadata", str(bad), "--out", str(tmp_path / "o")]
        )
    assert exc.value.code == 2 and "line 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        dpg.main(["--model", "m", "--prompts", str(DPG_PROMPTS), "--out", "o", "--images-per-prompt", "3"])
    assert exc.value.code == 2 and "images-per-prompt=3" in capsys.readouterr().err


# -- VLMEvalKit wrapper -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm")
    paths = {}
    for name in ("chelsea", "astronaut"):
        arr = (smoke.photo(name, 32).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        paths[name] = d / f"{name}.png"
        Image.fromarray(arr).save(paths[name])
    return paths


def test_vlm_answers_a_message(model, images):
    vlm = CheersVLM(model=model, max_new_tokens=4)
    assert vlm.INSTALL_REQ is False and vlm.INTERLEAVE is False and vlm.use_custom_prompt("MMBench") is False
    msg = [
        {"type": "image", "value": str(images["chelsea"])},
        {"type": "text", "value": "What animal is this?"},
    ]
    ans = vlm.generate(msg, dataset="MMBench_DEV_EN")
    assert isinstance(ans, str)
    # the same answer from VLMEvalKit's other message forms, from generate_inner, and from answer() directly
    assert vlm.generate([str(images["chelsea"]), "What animal is this?"]) == ans
    assert vlm.generate_inner(msg) == ans
    pixels_ = vlm.load_image(images["chelsea"])
    assert pixels_.shape == (1, 3, model.image_size, model.image_size)
    assert model.answer(pixels_, ["What animal is this?"], max_new_tokens=4)[0].strip() == ans


def test_vlm_preprocessing_pads_the_longer_side(model, tmp_path):
    vlm = CheersVLM(model=model)
    path = tmp_path / "wide.png"
    Image.new("RGB", (64, 32), (255, 255, 255)).save(path)
    x = vlm.load_image(path)[0]
    s = model.image_size
    assert x.shape == (3, s, s)
    assert torch.all(x[:, s // 4 : 3 * s // 4] == 1) and torch.all(x[:, : s // 4 - 1] == 0)


def test_vlm_several_images_and_no_image(model, images):
    vlm = CheersVLM(model=model, max_new_tokens=4)
    q = {"type": "text", "value": "Describe."}
    first_only = vlm.generate([{"type": "image", "value": str(images["chelsea"])}, q])
    two = [
        {"type": "image", "value": str(images["chelsea"])},
        {"type": "image", "value": str(images["astronaut"])},
        q,
    ]
    with pytest.warns(UserWarning, match="only the first is used"):
        assert vlm.generate(two) == first_only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlm.generate(two)  # warned once only
    with pytest.raises(NotImplementedError, match="no image"):
        vlm.generate("What is two plus two?")
    with pytest.raises(NotImplementedError, match="no image"):
        vlm.generate([q])


def test_vlm_bad_construction_and_messages(model, tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        CheersVLM()
    with pytest.raises(TypeError, match="unknown option"):
        CheersVLM(model=model, temprature=0.1)
    vlm = CheersVLM(model=model)
    with pytest.raises(ValueError, match="only text and image"):
        vlm.generate([{"type": "video", "value": "x.mp4"}])
    with pytest.raises(ValueError, match="cannot read image"):
        vlm.generate(
            [{"type": "image", "value": str(tmp_path / "missing.png")}, {"type": "text", "value": "q"}]
        )
    vlm.set_dump_image(lambda line: [f"{line['index']}.jpg"])
    assert vlm.dump_image({"index": 3}, "MME") == ["3.jpg"]


def test_mains_run_end_to_end(model, images, tmp_path, monkeypatch, capsys):
    loaded = []

    def load_any(path):
        loaded.append(path)
        return model

    fake = types.ModuleType("cheers_pl.io.export")
    fake.load_any = load_any
    monkeypatch.setitem(sys.modules, "cheers_pl.io.export", fake)
    common = ["--model", "ckpt/x", "--steps", "1", "--device", "cpu"]
    assert (
        geneval.main([*common, "--metadata", str(GENEVAL_META), "--out", str(tmp_path / "g"), "--limit", "1"])
        == 0
    )
    assert len(list((tmp_path / "g" / "00000" / "samples").glob("*.png"))) == 4
    assert json.loads((tmp_path / "g" / "run.json").read_text())["model_id"] == "ckpt/x"
    assert (
        dpg.main([*common, "--prompts", str(DPG_PROMPTS), "--out", str(tmp_path / "d"), "--limit", "1"]) == 0
    )
    assert [p.name for p in (tmp_path / "d").glob("*.png")] == ["0.png"]
    capsys.readouterr()
    args = [
        "--model",
        "ckpt/x",
        "--image",
        str(images["chelsea"]),
        "--question",
        "What?",
        "--max-new-tokens",
        "3",
    ]
    assert vlmeval.main([*args, "--device", "cpu"]) == 0
    assert isinstance(capsys.readouterr().out, str) and loaded == ["ckpt/x"] * 3
