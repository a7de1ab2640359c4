"""Fuzzing the loader with damaged shards and malformed samples (hypothesis, derandomised).

For every example the loader must finish in bounded time (a thread with a hard limit), let no
exception escape but the documented stops, and account for what it was given: every sample
that was intact before the first damaged byte comes out, what comes out plus what is counted
as skipped is what it read, and a shard whose structure was damaged is flagged.
"""

import io
import json
import struct
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cheers_pl.data.mixture import MixtureDataset, TaskSource, decode_sample
from cheers_pl.data.schema import TASKS, SampleError
from cheers_pl.data.stream import EmptyStreamError, Slot, TaskStream
from cheers_pl.data.transforms import SampleEncoder
from cheers_pl.model import CheersModel
from cheers_pl.spec import CheersSpec
from tests.data.shardkit import png, raw_members, sample, sample_spans, write_raw, write_sink

LIMIT_S = 10.0  # per example: more than this is a hang
FUZZ = settings(
    max_examples=50,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FAULTS = ("missing_shard", "truncated_shard", "shard_error")
SCALE = 1_000_000  # offsets are drawn in [0, SCALE] and scaled to the shard's length


@pytest.fixture(scope="module")
def encoder():
    model = CheersModel(CheersSpec.tiny())
    return type("Encoder", (SampleEncoder,), {"__repr__": lambda self: "<encoder>"})(
        model.processor, model.image_size
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One shard written by the recipes' writer: 3 understanding, 3 generation, 2 text samples."""
    root = tmp_path_factory.mktemp("fuzz")
    samples = [
        sample(t, i) for t, n in (("understanding", 3), ("generation", 3), ("text", 2)) for i in range(n)
    ]
    path = write_sink(root / "base", samples)[0]
    spans, end = sample_spans(path)
    clean = {
        t: write_sink(root / t, [sample(t, 100 + i) for i in range(6)])[0] for t in ("understanding", "text")
    }
    return Base(root=root, data=Path(path).read_bytes(), spans=spans, end=end, clean=clean)


def bounded(fn, *args):
    """``fn(*args)`` in a thread; fails if it runs longer than :data:`LIMIT_S`."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(LIMIT_S)
    assert not thread.is_alive(), f"the loader hung for more than {LIMIT_S} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


class Base(dict):
    """The base shard and its layout (a short repr: hypothesis prints its arguments)."""

    def __repr__(self) -> str:
        return f"<base shard of {len(self['spans'])} samples>"


@dataclass
class Epoch:
    yielded: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    raws: int = 0
    faults: int = 0
    empty: bool = False


def one_epoch(paths: list[str], encoder: SampleEncoder) -> Epoch:
    """Epoch 0 of a stream over ``paths`` (in order, no buffer), decoded as the mixture does."""
    stream = TaskStream("fuzz", paths, Slot(), 0, 0, shuffle_shards=False)
    out = Epoch()
    try:
        for raw in stream:
            if stream.epoch > 0:
                break
            out.raws += 1
            try:
                out.yielded.append(decode_sample(encoder, raw)["id"])
            except SampleError as err:
                out.skipped[err.reason] += 1
    except EmptyStreamError:  # the documented stop: nothing readable at all
        out.empty = True
    out.faults = sum(stream.stats[k] for k in FAULTS)
    return out


# -- byte-level damage ---------------------------------------------------------------------------------
OFFSET = st.integers(0, SCALE)
BYTE_OPS = st.one_of(
    st.tuples(st.just("xor"), OFFSET, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("zero"), OFFSET, st.integers(1, 2048)),
    st.tuples(st.just("cut"), OFFSET),
    st.tuples(st.just("insert"), OFFSET, st.binary(min_size=1, max_size=700)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=2000)),
)


def damage(data: bytes, op: tuple) -> bytes:
    kind, *args = op
    at = args[0] * len(data) // SCALE if kind != "append" else len(data)
    if kind == "xor":
        mask = args[1]
        part = bytes(b ^ (m or 0xFF) for b, m in zip(data[at:], mask, strict=False))
        return data[:at] + part + data[at + len(part) :]
    if kind == "zero":
        n = min(args[1], len(data) - at)
        return data[:at] + bytes(n) + data[at + n :]
    if kind == "cut":
        return data[:at]
    if kind == "insert":
        return data[:at] + args[1] + data[at:]
    return data + args[0]


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n if len(a) != len(b) else -1)


def check_accounting(base, damaged: bytes, got: Epoch) -> None:
    """What holds for any damage."""
    assert got.raws == len(got.yielded) + sum(got.skipped.values())
    if got.empty:
        assert got.raws == 0 and got.faults >= 1
    diff = first_difference(base["data"], damaged)
    if diff < 0:  # nothing changed
        assert got.yielded == [key for key, _, _ in base["spans"]] and not got.faults
        return
    intact = [key for key, _, end in base["spans"] if end <= diff]
    assert set(intact) <= set(got.yielded), (intact, got)  # every sample before the damage comes out
    if not got.faults and any(damaged[diff:]):  # unflagged: the structure held, nothing vanished
        assert got.raws >= len(base["spans"]), got


@FUZZ
@given(op=BYTE_OPS)
def test_one_damage_to_a_shard_is_survived_and_accounted_for(base, encoder, tmp_path_factory, op):
    damaged = damage(base["data"], op)
    path = base["root"] / "one.tar"
    path.write_bytes(damaged)
    got = bounded(one_epoch, [str(path)], encoder)
    check_accounting(base, damaged, got)
    kind, end, size = op[0], base["end"], len(base["data"])
    if kind == "cut" and len(damaged) < end:  # cut before the end-of-archive marker: flagged
        assert got.faults >= 1, got
    if kind == "cut" and len(damaged) >= end + 512:  # only padding cut off: nothing lost
        assert len(got.yielded) == len(base["spans"]) and not got.faults
    if (kind == "append" or (kind == "insert" and op[1] * size // SCALE < size)) and any(op[-1]):
        assert got.faults >= 1, got  # shifted members or data after the end marker are never silent


@FUZZ
@given(ops=st.lists(BYTE_OPS, min_size=2, max_size=4))
def test_several_damages_to_a_shard_are_survived_and_accounted_for(base, encoder, ops):
    damaged = base["data"]
    for op in ops:
        damaged = damage(damaged, op)
    path = base["root"] / "many.tar"
    path.write_bytes(damaged)
    check_accounting(base, damaged, bounded(one_epoch, [str(path)], encoder))


# -- malformed sample fields ---------------------------------------------------------------------------
DELETE = object()
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
VALUE = JSON | st.just(DELETE)
IMAGE_FAULTS = ("missing", "extra", "empty", "garbage", "truncated", "huge", "bomb", "cmyk", "renamed")
MUTATIONS = st.one_of(
    st.tuples(st.just("valid")),
    st.tuples(st.just("json_bytes"), st.binary(max_size=200)),
    st.tuples(st.just("json_prefix"), st.integers(0, SCALE - 1)),
    st.tuples(st.just("deep"), st.integers(2_000, 100_000)),
    st.tuples(st.just("field"), st.sampled_from(["id", "task", "messages", "images", "meta"]), VALUE),
    st.tuples(st.just("message"), st.integers(0, 2), st.sampled_from(["role", "content", "extra"]), VALUE),
    st.tuples(
        st.just("markers"), st.integers(0, 2), st.sampled_from(["<image>", "<image_gen>", "<image>" * 2])
    ),
    st.tuples(st.just("image"), st.sampled_from(IMAGE_FAULTS), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("task"), st.text(max_size=12).filter(lambda t: t not in TASKS)),
)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` x ``height``, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (  # noqa: E731
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    )
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (12, 10), (0, 255, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def mutate(raw: dict, mutation: tuple) -> tuple[dict, str | None]:
    """(the damaged raw sample, "keep" / "skip" if its fate is certain, else None)."""
    kind, *args = mutation
    record = json.loads(raw["json"])
    has_images = bool(record["images"])
    fate: str | None = None
    if kind == "valid":
        return raw, "keep"
    if kind == "json_bytes":
        raw["json"], fate = args[0], "skip"
    elif kind == "json_prefix":
        raw["json"] = raw["json"][: args[0] * len(raw["json"]) // SCALE]
        fate = "skip"
    elif kind == "deep":
        raw["json"], fate = b"[" * args[0] + b"]" * args[0], "skip"
    elif kind == "task":
        record["task"], fate = args[0], "skip"
    elif kind == "field":
        name, value = args
        if value is DELETE:
            record.pop(name)
            fate = "skip" if name in ("id", "task", "messages") or has_images else "keep"
        else:
            record[name] = value
            fate = "keep" if name in ("id", "meta") else None
    elif kind == "message":
        i, name, value = args
        msg = record["messages"][i % len(record["messages"])]
        if value is DELETE:
            msg.pop(name, None)
            fate = "skip" if name != "extra" else "keep"
        else:
            msg[name] = value
            fate = "skip" if name == "extra" else None
    elif kind == "markers":
        i, marker = args
        msg = record["messages"][i % len(record["messages"])]
        msg["content"] += " " + marker  # one marker more than there are images
        fate = "skip"
    elif kind == "image" and has_images:
        how, noise = args
        name = record["images"][0]
        fate = "skip"
        if how == "missing":
            del raw[name]
        elif how == "extra":
            record["images"].append("img9.png")
            raw["img9.png"] = png(9)
        elif how == "empty":
            raw[name] = b""
        elif how == "garbage":
            raw[name] = b"\x89PNG\r\n\x1a\n" + noise
        elif how == "truncated":
            raw[name] = raw[name][: len(raw[name]) // 2]
        elif how == "huge":
            raw[name] = png_header(10_000, 10_000)  # over PIL's warning limit, no pixels: corrupt
        elif how == "bomb":
            raw[name] = png_header(40_000, 40_000)  # over PIL's decompression-bomb limit
        elif how == "cmyk":
            raw[name], fate = cmyk_jpeg(), "keep"  # repaired, not skipped
        elif how == "renamed":
            record["images"][0] = "img0.jpg"
            raw["img0.jpg"] = raw.pop(name)
            fate = "keep"  # the name's extension is never trusted
    else:
        fate = "keep"
    if kind in ("task", "field", "message", "markers", "image"):
        raw["json"] = json.dumps(record).encode()
    return raw, fate


@FUZZ
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(["understanding", "generation", "text"]), MUTATIONS), min_size=1, max_size=6
    )
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_malformed_samples_are_skipped_and_counted_never_fatal(base, encoder, mutations):
    raws, fates = [], []
    for j, (task, mutation) in enumerate(mutations):
        raw = {**raw_members(sample(task, j)), "__key__": f"s{j:02d}"}
        raw, fate = mutate(raw, mutation)
        raws.append(raw)
        fates.append((sample(task, j).id, fate))
    path = write_raw(base["root"] / "fields.tar", raws)
    got = bounded(one_epoch, [path], encoder)
    assert got.raws == len(raws) and not got.faults and not got.empty  # the tar itself is sound
    assert len(got.yielded) + sum(got.skipped.values()) == len(raws)
    for sid, fate in fates:
        if fate == "keep":
            assert sid in got.yielded, (sid, got)
    assert len(got.yielded) <= sum(f != "skip" for _, f in fates), (fates, got)


# -- the whole mixture: bounded, no escape, exact resume ----------------------------------------------
def batches(ds: MixtureDataset, n: int) -> list[list[str]]:
    it = iter(ds)
    return [next(it)["ids"] for _ in range(n)]


@FUZZ
@given(ops=st.lists(BYTE_OPS, min_size=1, max_size=3), both=st.booleans(), cut=st.integers(1, 5))
def test_the_mixture_survives_damaged_shards_and_resumes_exactly(base, encoder, ops, both, cut):
    damaged = base["data"]
    for op in ops:
        damaged = damage(damaged, op)
    path = base["root"] / "mix.tar"
    path.write_bytes(damaged)
    und = [str(path), str(path) if both else base["clean"]["understanding"]]
    tasks = {"understanding": TaskSource(und, 3), "text": TaskSource([base["clean"]["text"]], 1)}
    make = lambda: MixtureDataset(tasks, encoder, 2, seed=1, shuffle_buffer=3, max_consecutive_skips=100)  # noqa: E731
    try:
        reference_ds = make()
        reference = bounded(batches, reference_ds, cut + 5)
    except RuntimeError as err:  # the documented stop: a task whose every sample is unusable
        assert "in a row were unusable" in str(err) and both, err
        return
    first = make()
    head = bounded(batches, first, cut)
    second = make()
    second.load_state_dict(first.state_dict())
    assert head + bounded(batches, second, 5) == reference
    assert second.stats() == reference_ds.stats()
    stats = reference_ds.stats()
    if not both:
        assert "dropped_task/understanding" not in stats  # its clean shard keeps it going
    if "dropped_task/understanding" in stats:
        assert stats["dropped_task/understanding"] == 1 and any(k.endswith("/understanding") for k in stats)


@pytest.mark.parametrize(
    ("task", "mutation", "reason"),
    [
        ("understanding", ("field", "images", 5), "malformed"),  # TypeError in the schema's reader
        ("understanding", ("field", "images", [[1]]), "malformed"),  # unhashable member name
        ("text", ("deep", 100_000), "malformed"),  # RecursionError in the JSON parser
        ("generation", ("image", "bomb", b"x"), "image_too_large"),  # PIL's DecompressionBombError
        ("understanding", ("image", "huge", b"x"), "corrupt_image"),
        ("understanding", ("image", "empty", b"x"), "corrupt_image"),
        ("understanding", ("image", "garbage", b"x"), "corrupt_image"),
        ("understanding", ("image", "missing", b"x"), "missing_image"),
        ("generation", ("image", "extra", b"x"), "marker_mismatch"),
        ("understanding", ("markers", 0, "<image>"), "marker_mismatch"),
        ("text", ("message", 0, "content", 7), "empty_text"),
        ("text", ("message", 1, "role", DELETE), "bad_message"),
        ("text", ("message", 0, "role", {"x": 1}), "bad_message"),
        ("text", ("field", "messages", "hi"), "bad_json"),
        ("text", ("json_bytes", b"\xff\xfe"), "bad_json"),
        ("text", ("json_prefix", SCALE // 2), "bad_json"),
        ("text", ("task", "painting"), "unknown_task"),
        ("generation", ("field", "task", "text"), "bad_layout"),
        ("understanding", ("image", "cmyk", b"x"), None),  # repaired, kept
        ("understanding", ("image", "renamed", b"x"), None),  # the extension is not trusted
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_each_kind_of_malformed_sample_has_its_reason(encoder, task, mutation, reason):
    raw, _ = mutate(raw_members(sample(task, 1)), mutation)
    if reason is None:
        assert decode_sample(encoder, raw)["id"] == f"{task}-0001"
    else:
        with pytest.raises(SampleError) as err:
            decode_sample(encoder, raw)
        assert err.value.reason == reason
