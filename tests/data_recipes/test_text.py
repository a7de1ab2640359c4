"""The text recipe: LLaVA conversations and role/content messages -> text samples."""

from data_recipes import text
from tests.data_recipes.util import check_output, run_recipe, skipped_ids, write_jsonl


def chat(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def test_both_formats_and_bad_lines(tmp_path):
    conversations = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    rows = [
        {"id": "conv", "conversations": conversations},
        {"id": "msgs", "messages": chat(("system", "Be kind."), ("user", "2+2?"), ("assistant", "4"))},
        "{not json",
        {"id": "image", "messages": chat(("user", "<image>\nx"), ("assistant", "y"))},
        {"id": "neither", "text": "hello"},
        {"id": "user-only", "messages": chat(("user", "hello?"))},
        {"id": "empty", "messages": chat(("user", ""), ("assistant", "y"))},
    ]
    src = write_jsonl(tmp_path / "chats.jsonl", rows)
    manifest = run_recipe(text, [src, "--out", tmp_path / "out"])
    _, samples = check_output(tmp_path / "out")
    assert [(s.id, s.task) for s in samples] == [("conv", "text"), ("msgs", "text")]
    assert samples[0].messages == chat(("user", "Hi"), ("assistant", "Hello."))
    assert samples[1].messages[0] == {"role": "system", "content": "Be kind."}
    assert manifest["skipped"] == {
        "bad_json": 1,
        "marker_mismatch": 1,
        "bad_record": 1,
        "bad_layout": 1,
        "empty_text": 1,
    }
    assert skipped_ids(manifest, "bad_json") == ["chats.jsonl:3"]
    assert skipped_ids(manifest, "marker_mismatch") == ["image"]


def test_maxcount_splits_shards(tmp_path):
    rows = [{"id": f"t{i}", "messages": chat(("user", "q"), ("assistant", "a"))} for i in range(7)]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    manifest = run_recipe(text, [src, "--maxcount", "3", "--out", tmp_path / "o"])
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    check_output(tmp_path / "o")
