"""The captions recipe: JSONL, CSV and parquet pairs; captioning and text-to-image modes."""

import csv
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_recipes import captions
from data_recipes.common import CAPTION_QUESTIONS, caption_question
from tests.data_recipes.util import check_output, run_recipe, skipped_ids, write_image, write_jsonl

ROWS = [("cat.png", "a cat"), ("sub/dog.png", "a dog"), ("bird.png", "a bird")]


@pytest.fixture
def root(tmp_path):
    for i, (name, _) in enumerate(ROWS):
        write_image(tmp_path / name, seed=i)
    return tmp_path


def test_jsonl_both_modes(root):
    src = write_jsonl(root / "pairs.jsonl", [{"image": p, "caption": c} for p, c in ROWS])
    manifest = run_recipe(captions, [src, "--out", root / "out"])
    assert manifest["tasks"] == {"understanding": 3, "generation": 3}
    _, samples = check_output(root / "out")
    cap, t2i = samples[0], samples[1]
    assert cap.id == "pairs-0000001-cap" and t2i.id == "pairs-0000001-t2i"
    assert cap.messages == [
        {"role": "user", "content": "<image>\n" + caption_question("pairs-0000001")},
        {"role": "assistant", "content": "a cat"},
    ]
    assert t2i.messages == [
        {"role": "user", "content": "a cat"},
        {"role": "assistant", "content": "<image_gen>"},
    ]
    assert cap.images == t2i.images == [(root / "cat.png").read_bytes()]


def test_questions_are_picked_by_id():
    picked = {caption_question(f"id-{i}") for i in range(100)}
    assert picked == set(CAPTION_QUESTIONS)
    assert caption_question("id-7") == caption_question("id-7")


@pytest.mark.parametrize("mode, tasks", [("caption", {"understanding": 3}), ("t2i", {"generation": 3})])
def test_csv_single_mode_keeps_ids(root, mode, tasks):
    src = root / "pairs.csv"
    with open(src, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "path", "text"])
        writer.writerows([(f"k{i}", p, c) for i, (p, c) in enumerate(ROWS)])
    argv = [src, "--image-column", "path", "--caption-column", "text", "--id-column", "key", "--mode", mode]
    manifest = run_recipe(captions, [*argv, "--out", root / "out", "--maxcount", "2"])
    assert manifest["tasks"] == tasks and [s["samples"] for s in manifest["shards"]] == [2, 1]
    _, samples = check_output(root / "out")
    assert [s.id for s in samples] == ["k0", "k1", "k2"]


def test_parquet_with_paths_bytes_and_structs(root):
    images = [(root / p).read_bytes() for p, _ in ROWS]
    texts = [c for _, c in ROWS]
    pq.write_table(pa.table({"image": [p for p, _ in ROWS], "caption": texts}), root / "paths.parquet")
    pq.write_table(pa.table({"image": images, "caption": texts}), root / "bytes.parquet")
    structs = [{"bytes": data, "path": p} for data, (p, _) in zip(images, ROWS, strict=True)]
    pq.write_table(pa.table({"image": structs, "caption": texts}), root / "structs.parquet")
    for name in ["paths", "bytes", "structs"]:
        manifest = run_recipe(captions, [root / f"{name}.parquet", "--mode", "caption", "--out", root / name])
        assert manifest["tasks"] == {"understanding": 3}
        _, samples = check_output(root / name)
        assert [s.images[0] for s in samples] == images
        assert [s.messages[1]["content"] for s in samples] == texts


def test_bad_pairs_are_counted(root):
    (root / "fake.jpg").write_bytes((root / "cat.png").read_bytes())  # named JPEG, really PNG
    (root / "cut.png").write_bytes((root / "cat.png").read_bytes()[:80])
    rows = [
        {"image": "fake.jpg", "caption": "a fake jpeg", "id": "fake"},
        {"image": "cat.png", "caption": "   ", "id": "blank"},
        {"image": "cat.png", "id": "nocap"},
        {"image": "missing.png", "caption": "x", "id": "missing"},
        {"image": "../outside.png", "caption": "x", "id": "outside"},
        {"image": "cut.png", "caption": "x", "id": "cut"},
        "{broken",
        {"caption": "no image", "id": "noimage"},
    ]
    src = write_jsonl(root / "pairs.jsonl", rows)
    manifest = run_recipe(captions, [src, "--id-column", "id", "--mode", "t2i", "--out", root / "out"])
    _, samples = check_output(root / "out")
    assert [s.id for s in samples] == ["fake"]
    with tarfile.open(root / "out" / manifest["shards"][0]["file"]) as tar:
        assert "fake.img0.png" in tar.getnames()
    assert manifest["skipped"] == {
        "empty_text": 2,
        "missing_image": 2,
        "bad_path": 1,
        "corrupt_image": 1,
        "bad_json": 1,
    }
    assert skipped_ids(manifest, "empty_text") == ["blank", "nocap"]
    assert skipped_ids(manifest, "missing_image") == ["missing", "noimage"]
    assert skipped_ids(manifest, "bad_path") == ["outside"]
    assert skipped_ids(manifest, "corrupt_image") == ["cut"]
    assert skipped_ids(manifest, "bad_json") == ["pairs.jsonl:7"]


def test_a_missing_column_is_an_error(root):
    src = root / "pairs.csv"
    src.write_text("file,caption\ncat.png,a cat\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['image'\].*'file'"):
        run_recipe(captions, [src, "--out", root / "out"])
