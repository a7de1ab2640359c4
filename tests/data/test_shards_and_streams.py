"""Shard specs, raw reading, the per-slot split, the shuffle buffer and exact stream resume."""

import itertools
from pathlib import Path

import pytest

from cheers_pl.data.shards import ShardError, expand_shards, read_shard
from cheers_pl.data.stream import EmptyStreamError, Slot, TaskStream
from tests.data.shardkit import write_shards


@pytest.fixture
def gen_shards(tmp_path):
    return write_shards(tmp_path / "gen", "generation", 40, 6)  # 7 shards, the last one short


def ids(raws):
    return [r["__key__"] for r in raws]


def test_expand_specs(tmp_path, gen_shards):
    folder = str(tmp_path / "gen")
    assert expand_shards([folder]) == gen_shards
    assert expand_shards(folder + "/generation-{000000..000002}.tar") == gen_shards[:3]
    assert expand_shards(folder + "/*.tar") == gen_shards
    assert expand_shards(["http://host/a-{0..1}.tar"]) == ["http://host/a-0.tar", "http://host/a-1.tar"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shards(folder + "/nope-*.tar")
    with pytest.raises(FileNotFoundError, match="no .tar"):
        expand_shards(str(tmp_path))


def test_read_shard_from_an_offset(gen_shards):
    everything = list(read_shard(gen_shards[0]))
    assert [r["__index__"] for r in everything] == list(range(6))
    assert ids(read_shard(gen_shards[0], start=4)) == ids(everything[4:])


def test_truncated_and_missing_shards_raise_shard_errors(tmp_path, gen_shards):
    data = Path(gen_shards[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="cut.tar") as err:
        list(read_shard(str(cut)))
    assert 0 < err.value.samples_read < 6
    with pytest.raises(ShardError, match="missing.tar"):
        list(read_shard(str(tmp_path / "missing.tar")))


@pytest.mark.parametrize(("world", "workers"), [(1, 3), (2, 2), (3, 4)])
def test_slots_split_an_epoch_without_overlap(gen_shards, world, workers):
    seen = []
    for rank, worker in itertools.product(range(world), range(workers)):
        stream = TaskStream("gen", gen_shards, Slot(rank, world, worker, workers), seed=1, shuffle_buffer=0)
        urls, stride = stream.epoch_shards(0)
        per_epoch = sum(
            1
            for u in urls
            for r in read_shard(u)
            if stride == 1 or r["__index__"] % stride == stream.slot.index
        )
        seen += ids(itertools.islice(stream, per_epoch))
    assert sorted(seen) == sorted(f"generation-{i:04d}" for i in range(40))  # each sample exactly once


def test_shard_order_changes_per_epoch_but_is_seeded(gen_shards):
    s = TaskStream("gen", gen_shards, Slot(), seed=3, shuffle_buffer=0)
    assert s.epoch_shards(0)[0] != s.epoch_shards(1)[0]
    assert s.epoch_shards(0)[0] == TaskStream("gen", gen_shards, Slot(), seed=3).epoch_shards(0)[0]


@pytest.mark.parametrize("cut", [0, 1, 5, 17, 39, 40, 57])
@pytest.mark.parametrize("buffer", [0, 8])
def test_resume_continues_with_exactly_the_next_samples(gen_shards, cut, buffer):
    ref = ids(itertools.islice(TaskStream("gen", gen_shards, Slot(), 2, buffer), cut + 30))
    first = TaskStream("gen", gen_shards, Slot(), 2, buffer)
    it = iter(first)
    head = ids(itertools.islice(it, cut))
    state = first.state_dict()
    resumed = TaskStream("gen", gen_shards, Slot(), 2, buffer)
    resumed.load_state_dict(state)
    assert head + ids(itertools.islice(resumed, 30)) == ref


def test_shuffle_buffer_shuffles(gen_shards):
    plain = ids(itertools.islice(TaskStream("g", gen_shards, Slot(), 0, 0, shuffle_shards=False), 24))
    mixed = ids(itertools.islice(TaskStream("g", gen_shards, Slot(), 0, 16, shuffle_shards=False), 24))
    assert plain == sorted(plain) and mixed != sorted(mixed)
    assert len(set(mixed)) == 24 and set(mixed) <= {f"generation-{i:04d}" for i in range(40)}


def test_a_broken_shard_is_counted_and_skipped(tmp_path, gen_shards):
    Path(gen_shards[2]).write_bytes(b"garbage" * 100)
    stream = TaskStream("gen", gen_shards, Slot(), 0, 0, shuffle_shards=False)
    got = ids(itertools.islice(stream, 34))
    assert "generation-0012" not in got and "generation-0018" in got
    assert stream.stats["shard_error"] == 1


def test_a_stream_with_no_readable_shard_says_so(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"x")
    with pytest.raises(EmptyStreamError, match="'gen'"):
        next(iter(TaskStream("gen", [str(bad)], Slot())))
    with pytest.raises(ValueError, match="no shards"):
        TaskStream("gen", [], Slot())
