"""Issue 14, item 4: one bad record never stops a recipe; an interrupted run never blocks its rerun;
``--prefix`` and ``--out`` mistakes are refused at parse time in one line."""

import json
import os

import pytest

from cheers_pl.data.schema import Sample, SampleError
from data_recipes import captions, cli, llava
from data_recipes.writer import INCOMPLETE, ShardSink, read_image_file
from tests.data_recipes.util import check_output, run_recipe, skipped_ids, write_image


def chat(image: str, sample_id: str) -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
    return {"id": sample_id, "image": image, "conversations": turns}


def txt(sample_id: str, answer: str = "2") -> Sample:
    return Sample(
        sample_id, "text", [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": answer}]
    )


BAD_PATHS = {  # id: image path that makes Path.resolve() / exists() raise
    "loop": "loop/x.png",
    "nul": "a\x00b.png",
    "long-name": "x" * 300 + ".png",
    "long-path": "d/" * 3000 + "x.png",
}


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "images"
    write_image(root / "ok.png")
    (root / "loop").symlink_to("loop")
    return root


def test_paths_that_make_the_os_raise_are_bad_paths(root):
    for rel in BAD_PATHS.values():
        with pytest.raises(SampleError) as err:
            read_image_file(root, rel)
        assert err.value.reason == "bad_path", rel


def test_a_recipe_skips_and_counts_records_whose_path_makes_the_os_raise(tmp_path, root):
    records = [chat(path, sid) for sid, path in BAD_PATHS.items()] + [chat("ok.png", "ok")]
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = run_recipe(llava, [src, "--image-root", root, "--out", tmp_path / "out"])
    _, samples = check_output(tmp_path / "out")
    assert [s.id for s in samples] == ["ok"]
    assert manifest["skipped"] == {"bad_path": 4}
    assert skipped_ids(manifest, "bad_path") == list(BAD_PATHS)


def test_non_utf8_jsonl_lines_are_skipped_and_named_by_file_and_line(tmp_path, root):
    good = json.dumps(chat("ok.png", "ok")).encode()
    bad = json.dumps(chat("ok.png", "bad")).encode().replace(b"Noise.", b"No\xffise.")
    (tmp_path / "data.jsonl").write_bytes(bad + b"\n" + good + b"\n" + b"\x80\x81\n")
    manifest = run_recipe(llava, [tmp_path / "data.jsonl", "--image-root", root, "--out", tmp_path / "out"])
    _, samples = check_output(tmp_path / "out")
    assert [s.id for s in samples] == ["ok"]
    assert manifest["skipped"] == {"bad_encoding": 2}
    assert skipped_ids(manifest, "bad_encoding") == ["data.jsonl:1", "data.jsonl:3"]
    assert "0xff" in manifest["skipped_examples"][0]["message"]


def test_non_utf8_csv_rows_are_skipped_and_named_by_file_and_line(tmp_path, root):
    table = b"image,caption\nok.png,a good caption\nok.png,caf\xe9 au lait\nok.png,another one\n"
    (root / "pairs.csv").write_bytes(table)
    manifest = run_recipe(captions, [root / "pairs.csv", "--mode", "t2i", "--out", tmp_path / "out"])
    _, samples = check_output(tmp_path / "out")
    assert [s.messages[0]["content"] for s in samples] == ["a good caption", "another one"]
    assert manifest["skipped"] == {"bad_encoding": 1}
    assert skipped_ids(manifest, "bad_encoding") == ["pairs.csv:3"]


def test_sink_skips_text_with_lone_surrogates(tmp_path):
    """The sink's own check, for text no reader checked (undecodable file names, JSON escapes)."""
    with ShardSink(tmp_path / "out") as sink:
        sink.add(txt("fine"))
        sink.add(txt("lone", "caf\udce9"))
    assert sink.manifest["skipped"] == {"bad_encoding": 1} and skipped_ids(sink.manifest, "bad_encoding") == [
        "lone"
    ]


def test_an_interrupted_run_is_replaced_by_its_rerun(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), ShardSink(out, maxcount=1) as sink:
        sink.add(txt("a"))
        sink.add(txt("b"))
        raise RuntimeError("killed")  # a kill leaves the same: shards, the marker, no manifest
    assert (out / INCOMPLETE).is_file() and not (out / "manifest.json").exists()
    with ShardSink(out) as sink:  # no overwrite needed
        sink.add(txt("c"))
    assert not (out / INCOMPLETE).exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    _, samples = check_output(out)
    assert [s.id for s in samples] == ["c"]
    with pytest.raises(FileExistsError, match="--overwrite"), ShardSink(out):  # a finished run still holds
        pass


def test_an_interrupted_run_with_another_prefix_leaves_no_orphan_shards(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), ShardSink(out, prefix="old") as sink:
        sink.add(txt("a"))
        raise RuntimeError("killed")
    with ShardSink(out, prefix="new") as sink:
        sink.add(txt("b"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "new-000000.tar"]


def test_shards_without_a_marker_are_not_ours_and_refused(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="shard-000000.tar"), ShardSink(tmp_path):
        pass


def test_the_cli_rerun_after_an_interrupted_run_succeeds(tmp_path, root, capsys):
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps(chat("ok.png", "ok")) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"cut off")
    (out / INCOMPLETE).write_text(json.dumps({"prefix": "shard", "pid": 1}))
    assert cli.main(["llava", str(src), "--image-root", str(root), "--out", str(out)]) == 0
    check_output(out)


@pytest.mark.parametrize("prefix", ["../x", "a/b", "/abs", ".", "..", "", "a\\b", "*"])
def test_a_prefix_with_a_path_separator_is_refused_at_parse_time(tmp_path, capsys, prefix):
    with pytest.raises(SystemExit) as err:
        cli.main(["text", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--prefix", prefix])
    assert err.value.code == 2
    assert "--prefix" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.parent.glob("x-*.tar"))


def test_an_out_that_is_a_file_is_refused_at_parse_time(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(SystemExit) as err:
            cli.main(["text", str(tmp_path / "in.jsonl"), "--out", str(out)])
        assert err.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert "--out" in lines[-1] and "is a file" in lines[-1]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_at_parse_time(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit):
        cli.main(["text", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "ro")])
    assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--maxcount", "--maxsize"])
def test_shard_limits_must_be_positive(tmp_path, capsys, option):
    with pytest.raises(SystemExit):
        cli.main(["text", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"), option, "0"])
    assert option in capsys.readouterr().err


def test_a_run_error_is_one_line_not_a_traceback(tmp_path, capsys):
    assert cli.main(["text", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.jsonl" in err and "Traceback" not in err
