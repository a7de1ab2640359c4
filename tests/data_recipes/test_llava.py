"""The llava recipe: every task from LLaVA-style records, and bad records counted by reason."""

import json

import pytest

from data_recipes import llava
from tests.data_recipes.util import check_output, run_recipe, skipped_ids, write_image, write_jsonl


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    return {name: write_image(root / name, seed=i) for i, name in enumerate(["a.png", "b.png", "c/d.png"])}


RECORDS = [
    {"id": "und", "image": "a.png", "conversations": [human("<image>\nWhat is this?"), gpt("Noise.")]},
    {"id": "two", "image": "a.png, c/d.png", "conversations": [human("<image><image>\nSame?"), gpt("No.")]},
    {"id": "txt", "conversations": [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Hello.")]},
    {"id": "gen", "image": ["b.png"], "conversations": [human("Draw noise."), gpt("<image>")]},
    {
        "id": "edit",
        "image": ["a.png", "b.png"],
        "conversations": [human("<image>\nMake it b."), gpt("<image>")],
    },
]


def test_every_task(tmp_path, images):
    src = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    manifest = run_recipe(llava, [src, "--image-root", tmp_path / "images", "--out", tmp_path / "out"])
    assert manifest["skipped"] == {}
    manifest2, samples = check_output(tmp_path / "out")
    assert manifest == manifest2
    by_id = {s.id: s for s in samples}
    assert {i: s.task for i, s in by_id.items()} == {
        "und": "understanding",
        "two": "understanding",
        "txt": "text",
        "gen": "generation",
        "edit": "edit",
    }
    assert by_id["two"].images == [images["a.png"], images["c/d.png"]]
    edit = by_id["edit"]
    assert [m["role"] for m in edit.messages] == ["user", "assistant"]
    assert (
        edit.messages[0]["content"] == "<image>\nMake it b." and edit.messages[1]["content"] == "<image_gen>"
    )
    assert edit.images == [images["a.png"], images["b.png"]]  # source first, then the target
    assert edit.markers() == [("user", "<image>"), ("assistant", "<image_gen>")]
    assert by_id["txt"].messages[0] == {"role": "system", "content": "Be brief."}
    assert by_id["gen"].meta == {"source": "data.jsonl", "images": ["b.png"]}


def test_json_list_and_default_image_root(tmp_path, images):
    src = tmp_path / "images" / "data.json"
    src.write_text(json.dumps(RECORDS, indent=2))
    manifest = run_recipe(llava, [src, "--out", tmp_path / "out", "--maxcount", "2"])
    assert manifest["samples"] == 5 and len(manifest["shards"]) == 3
    check_output(tmp_path / "out")


def test_bad_records_are_counted(tmp_path, images):
    (tmp_path / "images" / "broken.png").write_bytes(images["a.png"][:100])
    records = [
        RECORDS[0],
        '{"id": "cut", "image": "a.png", "conversa',
        {"id": "many-markers", "image": "a.png", "conversations": [human("<image><image>\nx"), gpt("y")]},
        {"id": "few-markers", "image": ["a.png", "b.png"], "conversations": [human("<image>\nx"), gpt("y")]},
        {"id": "gone", "image": "nope.png", "conversations": [human("<image>\nx"), gpt("y")]},
        {"id": "escape", "image": "../data.jsonl", "conversations": [human("<image>\nx"), gpt("y")]},
        {"id": "broken", "image": "broken.png", "conversations": [human("<image>\nx"), gpt("y")]},
        {"id": "who", "conversations": [{"from": "robot", "value": "x"}, gpt("y")]},
        {"id": "silent", "conversations": [human("x"), gpt("  ")]},
        ["not", "an", "object"],
        RECORDS[3],
    ]
    src = write_jsonl(tmp_path / "data.jsonl", records)
    manifest = run_recipe(llava, [src, "--image-root", tmp_path / "images", "--out", tmp_path / "out"])
    _, samples = check_output(tmp_path / "out")
    assert [s.id for s in samples] == ["und", "gen"]
    assert manifest["skipped"] == {
        "bad_json": 1,
        "marker_mismatch": 2,
        "missing_image": 1,
        "bad_path": 1,
        "corrupt_image": 1,
        "bad_message": 1,
        "empty_text": 1,
        "bad_record": 1,
    }
    (bad_json,) = [e for e in manifest["skipped_examples"] if e["reason"] == "bad_json"]
    assert bad_json["id"] == "data.jsonl:2" and "line 2" in bad_json["message"]
    assert skipped_ids(manifest, "marker_mismatch") == ["many-markers", "few-markers"]
    assert skipped_ids(manifest, "missing_image") == ["gone"]
    assert skipped_ids(manifest, "bad_path") == ["escape"]
    assert skipped_ids(manifest, "corrupt_image") == ["broken"]
    assert skipped_ids(manifest, "bad_record") == ["data-10"]  # no id: file stem and line number
    assert "nope.png" in next(e["message"] for e in manifest["skipped_examples"] if e["id"] == "gone")


def test_a_broken_json_list_is_an_error(tmp_path):
    src = tmp_path / "data.json"
    src.write_text('[{"id": 1}, {')
    with pytest.raises(ValueError, match="data.json"):
        run_recipe(llava, [src, "--out", tmp_path / "out"])
