"""The imagefolder recipe: a class tree plus captions, repeats, class-name fallback, bad entries."""

import pytest

from data_recipes import imagefolder
from tests.data_recipes.util import check_output, run_recipe, skipped_ids, write_image, write_jsonl

FILES = ["golden_retriever/1.png", "golden_retriever/2.jpg", "tabby/1.png", "tabby/3.JPEG"]


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "imagenet"
    for i, rel in enumerate(FILES):
        write_image(root / rel, seed=i, fmt="JPEG" if rel.lower().endswith(("jpg", "jpeg")) else "PNG")
    (root / "README.txt").write_text("not an image")
    return root


def test_repeat_triples_the_count(root, tmp_path):
    caps = write_jsonl(
        tmp_path / "caps.jsonl", [{"image": rel, "caption": f"caption {rel}"} for rel in FILES]
    )
    manifest = run_recipe(imagefolder, [root, "--captions", caps, "--out", tmp_path / "one"])
    assert manifest["tasks"] == {"generation": 4}
    manifest = run_recipe(
        imagefolder, [root, "--captions", caps, "--repeat", "3", "--out", tmp_path / "three"]
    )
    assert manifest["tasks"] == {"generation": 12}
    _, samples = check_output(tmp_path / "three")
    assert [s.id for s in samples[:3]] == [f"golden_retriever/1_r{k}" for k in range(3)]
    assert samples[0].messages[0]["content"] == "caption golden_retriever/1.png"
    assert samples[0].images == [(root / FILES[0]).read_bytes()]


def test_csv_captions_both_modes(root, tmp_path):
    caps = tmp_path / "caps.csv"
    caps.write_text("image,caption\n" + "".join(f"{rel},a photo {i}\n" for i, rel in enumerate(FILES)))
    manifest = run_recipe(
        imagefolder, [root, "--captions", caps, "--mode", "both", "--out", tmp_path / "out"]
    )
    assert manifest["tasks"] == {"generation": 4, "understanding": 4}
    check_output(tmp_path / "out")


def test_missing_captions_skip_or_class(root, tmp_path):
    rows = [
        {"image": FILES[0], "caption": "a dog"},
        {"image": FILES[1], "caption": ""},
        {"image": "../escape.png", "caption": "x"},
        {"image": "tabby/9.png", "caption": "x"},
        {"image": FILES[0], "caption": "again"},
        "not json",
    ]
    caps = write_jsonl(tmp_path / "caps.jsonl", rows)
    manifest = run_recipe(imagefolder, [root, "--captions", caps, "--out", tmp_path / "skip"])
    _, samples = check_output(tmp_path / "skip")
    assert [s.id for s in samples] == ["golden_retriever/1"]
    assert manifest["skipped"] == {
        "no_caption": 3,
        "bad_path": 1,
        "missing_image": 1,
        "duplicate_caption": 1,
        "bad_json": 1,
    }
    assert skipped_ids(manifest, "no_caption") == ["golden_retriever/2", "tabby/1", "tabby/3"]
    assert skipped_ids(manifest, "bad_path") == ["../escape.png"]
    assert skipped_ids(manifest, "missing_image") == ["tabby/9.png"]
    manifest = run_recipe(
        imagefolder, [root, "--captions", caps, "--missing-caption", "class", "--out", tmp_path / "class"]
    )
    _, samples = check_output(tmp_path / "class")
    prompts = {s.id: s.messages[0]["content"] for s in samples}
    assert prompts == {
        "golden_retriever/1": "a dog",
        "golden_retriever/2": "a photo of a golden retriever",
        "tabby/1": "a photo of a tabby",
        "tabby/3": "a photo of a tabby",
    }


def test_a_corrupt_file_is_counted_once(root, tmp_path):
    (root / "tabby" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    argv = [root, "--missing-caption", "class", "--repeat", "2", "--out", tmp_path / "out"]
    manifest = run_recipe(imagefolder, argv)
    assert manifest["skipped"] == {"corrupt_image": 1} and manifest["samples"] == 8
    assert skipped_ids(manifest, "corrupt_image") == ["tabby/bad"]
