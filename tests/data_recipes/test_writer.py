"""ShardSink: validation, real image formats, counts, manifests, no-overwrite."""

import json
import tarfile

import pytest

from cheers_pl.data.images import decode_image
from cheers_pl.data.schema import Sample, SampleError
from data_recipes.writer import ShardSink, read_image_file, verify_manifest
from tests.data_recipes.util import check_output, encode, picture, skipped_ids


def und(sample_id, image):
    return Sample(
        sample_id,
        "understanding",
        [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "Noise."}],
        [image],
    )


def gen(sample_id, image):
    return Sample(
        sample_id,
        "generation",
        [{"role": "user", "content": "noise"}, {"role": "assistant", "content": "<image_gen>"}],
        [image],
    )


def txt(sample_id):
    return Sample(
        sample_id, "text", [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    )


def test_tasks_shards_and_manifest(tmp_path):
    png = encode(picture())
    with ShardSink(tmp_path / "out", maxcount=3, recipe="unit") as sink:
        for i in range(4):
            assert sink.add(und(f"u{i}", png))
            assert sink.add(gen(f"g{i}", png))
        assert sink.add(txt("t0"))
    manifest, samples = check_output(tmp_path / "out")
    assert manifest["recipe"] == "unit"
    assert manifest["tasks"] == {"understanding": 4, "generation": 4, "text": 1}
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 3]
    assert manifest["shards"][0]["tasks"] == {"understanding": 2, "generation": 1}
    assert [s.id for s in samples] == ["u0", "g0", "u1", "g1", "u2", "g2", "u3", "g3", "t0"]
    assert samples[0].images == [png]  # the original bytes, not re-encoded
    assert (tmp_path / "out" / "manifest.json").exists() and manifest["skipped"] == {}


def test_real_format_decides_the_extension(tmp_path):
    jpeg, png = encode(picture(), "JPEG"), encode(picture())
    with ShardSink(tmp_path) as sink:
        sink.add(und("a", jpeg))
        sink.add(und("b", png))
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames() == ["a.img0.jpg", "a.json", "b.img0.png", "b.json"]
        record = json.loads(tar.extractfile("b.json").read())
    assert record["images"] == ["img0.png"]


@pytest.mark.parametrize(
    "mode, fmt, kw",
    [
        ("CMYK", "JPEG", {}),
        ("I;16", "PNG", {}),
        ("P", "PNG", {}),
        ("P", "PNG", {"transparency": 0}),
        ("P", "GIF", {}),
        ("L", "PNG", {}),
        ("L", "JPEG", {}),
        ("RGBA", "PNG", {}),
        ("RGB", "WEBP", {}),
        ("RGB", "BMP", {}),
    ],
)
def test_every_colour_mode_is_written(tmp_path, mode, fmt, kw):
    data = encode(picture(mode), fmt, **kw)
    with ShardSink(tmp_path) as sink:
        assert sink.add(gen("x", data))
    _, (sample,) = check_output(tmp_path)
    assert sample.images == [data]
    img, repaired = decode_image(sample.images[0])
    assert img.mode == "RGB" and img.size == (32, 24)
    assert (repaired is None) == (mode in ("RGB", "L"))  # 8-bit grayscale converts exactly


def test_bad_samples_are_counted_and_the_rest_written(tmp_path):
    png = encode(picture())
    with ShardSink(tmp_path) as sink:
        assert not sink.add(und("truncated", png[: len(png) // 2]))
        assert not sink.add(und("garbage", b"not an image at all"))
        assert not sink.add(und("jpeg-cut", encode(picture(), "JPEG")[:300]))
        bad = Sample(
            "two-markers", "understanding", und("x", png).messages[:1] * 2 + und("x", png).messages[1:]
        )
        assert not sink.add(bad)
        assert not sink.add(Sample("no-answer", "text", [{"role": "user", "content": "hi"}]))
        assert not sink.add(
            Sample("empty", "text", [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}])
        )
        assert sink.add(und("good", png))
        sink.skip("line-7", "bad_json", "line 7: Expecting value")
    manifest, samples = check_output(tmp_path)
    assert [s.id for s in samples] == ["good"]
    assert manifest["skipped"] == {
        "corrupt_image": 3,
        "marker_mismatch": 1,
        "bad_layout": 1,
        "empty_text": 1,
        "bad_json": 1,
    }
    assert skipped_ids(manifest, "corrupt_image") == ["truncated", "garbage", "jpeg-cut"]
    assert skipped_ids(manifest, "marker_mismatch") == ["two-markers"]
    assert all(
        e["message"] and not e["message"].startswith(e["reason"]) for e in manifest["skipped_examples"]
    )


def test_only_the_first_50_examples_are_kept(tmp_path):
    with ShardSink(tmp_path) as sink:
        for i in range(60):
            sink.skip(f"s{i}", "bad_json", "x")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["skipped"] == {"bad_json": 60} and len(manifest["skipped_examples"]) == 50
    assert manifest["shards"] == [] and manifest["samples"] == 0
    assert not list(tmp_path.glob("*.tar"))


def test_duplicate_keys_are_renamed(tmp_path):
    with ShardSink(tmp_path) as sink:
        for sample_id in ["a.b", "a_b", "a/b", "c"]:
            sink.add(txt(sample_id))
    manifest, samples = check_output(tmp_path)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        keys = [n.split(".")[0] for n in tar.getnames()]
    assert keys == ["a_b", "a_b_dup1", "a_b_dup2", "c"]
    assert [s.id for s in samples] == ["a.b", "a_b", "a/b", "c"]
    assert manifest["repaired"] == {"renamed_duplicate_key": 2}


def test_read_image_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"abc")
    assert read_image_file(tmp_path, "sub/a.png") == b"abc"
    assert read_image_file(tmp_path, "sub/../sub/a.png") == b"abc"
    cases = {"../x.png": "bad_path", "/etc/hostname": "bad_path", "sub/../../x": "bad_path", "": "bad_path"}
    cases.update({"sub/b.png": "missing_image", "sub": "missing_image"})
    for rel, reason in cases.items():
        with pytest.raises(SampleError) as err:
            read_image_file(tmp_path, rel)
        assert err.value.reason == reason
    with pytest.raises(SampleError, match="b.png"):
        read_image_file(tmp_path, "sub/b.png")


def test_no_overwrite_unless_asked(tmp_path):
    out = tmp_path / "out"
    with ShardSink(out, maxcount=1) as sink:
        for i in range(3):
            sink.add(txt(f"t{i}"))
    assert len(list(out.glob("*.tar"))) == 3
    with pytest.raises(FileExistsError, match=str(out)) as err, ShardSink(out):
        pass
    assert "shard-000000.tar" in str(err.value) and "manifest.json" in str(err.value)
    with ShardSink(out, maxcount=1, overwrite=True) as sink:
        sink.add(txt("only"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    manifest, samples = check_output(out)
    assert [s.id for s in samples] == ["only"]


def test_other_prefixes_and_files_are_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "other-000000.tar").write_bytes(b"")
    with ShardSink(tmp_path, prefix="mine") as sink:
        sink.add(txt("t"))
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "other-000000.tar").exists()


def test_no_manifest_after_an_exception(tmp_path):
    with pytest.raises(RuntimeError), ShardSink(tmp_path) as sink:
        sink.add(txt("t"))
        raise RuntimeError("boom")
    assert not (tmp_path / "manifest.json").exists()
    assert (tmp_path / "shard-000000.tar").exists()


def test_verify_manifest_catches_changes(tmp_path):
    with ShardSink(tmp_path, maxcount=1) as sink:
        sink.add(txt("a"))
        sink.add(txt("b"))
    assert verify_manifest(tmp_path)["ok"]
    (tmp_path / "shard-000002.tar").write_bytes((tmp_path / "shard-000001.tar").read_bytes())
    report = verify_manifest(tmp_path)
    assert not report["ok"] and any("shard-000002.tar is not in the manifest" in e for e in report["errors"])
    (tmp_path / "shard-000002.tar").unlink()
    with open(tmp_path / "shard-000001.tar", "r+b") as f:
        f.seek(600)
        f.write(b"X")
    report = verify_manifest(tmp_path)
    assert not report["ok"] and any("sha256" in e for e in report["errors"])
    (tmp_path / "shard-000000.tar").unlink()
    assert any("shard-000000.tar is missing" in e for e in verify_manifest(tmp_path)["errors"])
