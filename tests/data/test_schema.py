"""The sample schema: every task's layout, and each way a raw sample can be broken."""

import json

import pytest

from cheers_pl.data.schema import Sample, SampleError, from_raw, to_record, validate, wds_key
from tests.data.shardkit import png, raw_members, sample

U, A = "user", "assistant"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.mark.parametrize("task", ["understanding", "generation", "text"])
def test_each_task_round_trips_through_a_raw_sample(task):
    s = sample(task, 3)
    back = from_raw(raw_members(s))
    assert (back.id, back.task, back.messages, back.images) == (s.id, s.task, s.messages, s.images)


def test_edit_and_multi_image_samples():
    edit = Sample(
        "e", "edit", msgs((U, "<image><image>\nput them together"), (A, "<image_gen>")), [b"a", b"b", b"c"]
    )
    validate(edit)
    assert [mk for _, mk in edit.markers()] == ["<image>", "<image>", "<image_gen>"]
    two = Sample(
        "u", "understanding", msgs((U, "<image>\n<image>\ncompare"), (A, "left is bigger")), [b"a", b"b"]
    )
    validate(two)


@pytest.mark.parametrize(
    ("s", "reason"),
    [
        (Sample("x", "video", msgs((U, "hi"), (A, "yo"))), "unknown_task"),
        (Sample("x", "text", msgs((U, "hi"), (A, "  "))), "empty_text"),
        (Sample("x", "generation", msgs((U, ""), (A, "<image_gen>")), [b"i"]), "empty_text"),
        (Sample("x", "generation", msgs((U, "<image_gen>"), (A, "<image_gen>")), [b"i", b"j"]), "bad_layout"),
        (Sample("x", "understanding", msgs((U, "<image><image>\nq"), (A, "a")), [b"i"]), "marker_mismatch"),
        (Sample("x", "understanding", msgs((U, "q"), (A, "a")), []), "bad_layout"),
        (Sample("x", "text", msgs((U, "hi"))), "bad_layout"),
        (Sample("x", "text", [{"role": "bot", "content": "hi"}]), "bad_message"),
    ],
)
def test_invalid_samples_name_the_reason(s, reason):
    with pytest.raises(SampleError) as err:
        validate(s)
    assert err.value.reason == reason


def test_raw_sample_faults():
    good = raw_members(sample("understanding", 1))
    with pytest.raises(SampleError, match="missing_key"):
        from_raw({k: v for k, v in good.items() if k != "json"})
    with pytest.raises(SampleError, match="bad_json"):
        from_raw({**good, "json": b"{not json"})
    with pytest.raises(SampleError, match="missing_image.*img0.png"):
        from_raw({k: v for k, v in good.items() if k != "img0.png"})
    rec = json.loads(good["json"])
    del rec["task"]
    with pytest.raises(SampleError, match="missing_key.*'task'"):
        from_raw({**good, "json": json.dumps(rec).encode()})


def test_keys_are_webdataset_safe():
    assert wds_key("coco/val.2017/000123.jpg") == "coco_val_2017_000123_jpg"
    rec = to_record(Sample("a", "generation", msgs((U, "p"), (A, "<image_gen>")), [png(0)]), ["png"])
    assert rec["images"] == ["img0.png"]
