"""Data faults during a run: shards that disappear or are cut, tasks left with nothing readable,
specs that match nothing at setup, a DataLoader worker that dies; and exact resume through them."""

import itertools
import os
import pickle
import re
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from cheers_pl.data.datamodule import CheersDataModule, DataWorkerDiedError
from cheers_pl.data.mixture import NoDataError
from cheers_pl.data.schema import SampleError, from_raw
from cheers_pl.data.shards import MissingShardError, ShardError, read_shard
from cheers_pl.data.stream import Slot, TaskStream
from cheers_pl.model import CheersModel
from cheers_pl.spec import CheersSpec
from tests.data.shardkit import sample, sample_spans, write_shards, write_sink


@pytest.fixture(scope="module")
def model():
    return CheersModel(CheersSpec.tiny())


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Pristine shards: 60 samples of each task in shards of 8 (copied before being damaged)."""
    root = tmp_path_factory.mktemp("clean")
    for t in ("understanding", "generation", "text"):
        write_shards(root / t, t, 60, 8)
    return root


@pytest.fixture
def shards(clean, tmp_path):
    """A private copy of :func:`clean`: task -> folder."""
    shutil.copytree(clean, tmp_path / "data")
    return {t: tmp_path / "data" / t for t in ("understanding", "generation", "text")}


def ids(raws):
    return [r["__key__"] for r in raws]


def make(model, tasks, **kw):
    dm = CheersDataModule({t: {"shards": [str(p)], "ratio": r} for t, (p, r) in tasks.items()}, **kw)
    dm.attach(model.processor, model.image_size)
    dm.setup()
    return dm


def names(task, indices):
    return [f"{task}-{i:04d}" for i in indices]


# -- shards that disappear ---------------------------------------------------------------------------
def test_a_shard_deleted_mid_run_is_skipped_counted_and_named(tmp_path, caplog):
    paths = write_shards(tmp_path / "gen", "generation", 40, 6)  # 7 shards, the last one of 4
    stream = TaskStream("gen", paths, Slot(), 0, 0, shuffle_shards=False)
    it = iter(stream)
    head = ids(itertools.islice(it, 3))  # shard 0 is open now
    Path(paths[0]).unlink()  # the open one reads on to its end (the file stays until closed)
    Path(paths[2]).unlink()  # one not read yet
    with caplog.at_level("WARNING"):
        epoch0 = head + ids(itertools.islice(it, 34 - 3))
    assert epoch0 == names("generation", [i for i in range(40) if not 12 <= i < 18])
    assert stream.stats["missing_shard"] == 1 and stream.stats["shard_error"] == 0
    assert paths[2] in caplog.text and "is gone" in caplog.text
    epoch1 = ids(itertools.islice(it, 28))  # between epochs: now shard 0 is gone as well
    assert epoch1 == names("generation", [i for i in range(6, 40) if not 12 <= i < 18])
    assert stream.stats["missing_shard"] == 3  # counted per read attempt
    assert next(it)["__key__"] == "generation-0006"  # epoch 2 goes on with the shards left


def test_a_task_whose_shards_all_disappear_is_dropped_and_the_rest_renormalised(model, shards, caplog):
    dm = make(
        model,
        {"understanding": (shards["understanding"], 3), "generation": (shards["generation"], 6),
         "text": (shards["text"], 1)},
        batch_size=10,
        shuffle_buffer=0,
    )  # fmt: skip
    it = iter(dm.train_dataloader())
    assert "generation" in {t for _ in range(2) for t in next(it)["tasks"]}
    shutil.rmtree(shards["generation"])
    with caplog.at_level("WARNING"):
        after = [next(it)["tasks"] for _ in range(45)]
    tail = Counter(t for b in after[5:] for t in b)  # the open shard may still give a few at first
    assert "generation" not in tail
    share, n = tail["understanding"] / sum(tail.values()), sum(tail.values())
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5, tail  # 3 : 1 over the tasks left
    stats = dm.data_stats()
    assert stats["dropped_task/generation"] == 1 and stats["missing_shard/generation"] >= 7, stats
    assert "task 'generation' dropped" in caplog.text and "'understanding': 0.75" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_when_every_task_is_gone_the_run_stops_with_a_clear_error(model, shards, workers):
    dm = make(
        model,
        {"understanding": (shards["understanding"], 1), "text": (shards["text"], 1)},
        batch_size=2,
        shuffle_buffer=0,
        num_workers=workers,
    )
    it = iter(dm.train_dataloader())
    next(it)
    for folder in shards.values():
        shutil.rmtree(folder)
    start = time.monotonic()
    with pytest.raises(NoDataError) as err:
        for _ in range(500):
            next(it)
    assert time.monotonic() - start < 30
    text = str(err.value)
    assert "no task of the mixture has a readable sample left" in text
    assert "understanding" in text and "text" in text and "missing_shard" in text, text
    # the shard lists' status, file by file: with 2 workers the one that stops first names only its
    # own share of the shards (which share: a race), so any shard file of the two tasks
    assert re.search(r"(understanding|text)-\d{6}\.tar", text), text


# -- shards that are cut -------------------------------------------------------------------------------
def test_a_shard_cut_mid_run_keeps_the_samples_before_the_cut(tmp_path, caplog):
    big = write_shards(tmp_path / "a", "generation", 30, 30)[0]  # 4608 bytes a sample (pax headers)
    small = write_shards(tmp_path / "b", "understanding", 6, 6)[0]
    stream = TaskStream("mix", [big, small], Slot(), 0, 0, shuffle_shards=False)
    it = iter(stream)
    head = ids(itertools.islice(it, 3))
    spans, _ = sample_spans(big)
    os.truncate(big, spans[20][1] + 100)  # cut while open, far beyond what was read ahead
    spans, _ = sample_spans(small)
    os.truncate(small, spans[2][1] + 1000)  # cut before being read, inside sample 2's image
    with caplog.at_level("WARNING"):
        rest = []
        while stream.epoch == 0:
            rest.append(next(it)["__key__"])
    assert head + rest[:-1] == names("generation", range(20)) + names("understanding", range(2))
    assert stream.stats["truncated_shard"] == 2 and stream.stats["shard_error"] == 0
    assert big in caplog.text and small in caplog.text and "ends early" in caplog.text


def _tar(tmp_path, n=4):
    path = write_sink(tmp_path / "s", [sample("understanding", i) for i in range(n)])[0]
    spans, end = sample_spans(path)
    return Path(path), Path(path).read_bytes(), spans, end


def _damaged(path, data, spans, end, how):
    if how == "cut at a member boundary":
        path.write_bytes(data[: spans[2][1] + 1536])  # sample 2's image member, not its json
    elif how == "no end-of-archive marker":
        path.write_bytes(data[:end])
    elif how == "zeroed header":
        path.write_bytes(data[: spans[2][1]] + bytes(512) + data[spans[2][1] + 512 :])
    elif how == "bad header checksum":
        path.write_bytes(data[: spans[2][1] + 5] + b"X" + data[spans[2][1] + 6 :])
    elif how == "two tars concatenated":
        path.write_bytes(data + data)
    elif how == "zero padding":
        path.write_bytes(data + bytes(4096))
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize(
    ("how", "kind", "kept"),
    [
        ("cut at a member boundary", "truncated_shard", 3),  # the cut sample comes too, to be rejected
        ("no end-of-archive marker", "truncated_shard", 4),
        ("zeroed header", "shard_error", 2),  # tarfile alone would stop here silently
        ("bad header checksum", "shard_error", 2),  # idem
        ("two tars concatenated", "shard_error", 4),  # idem: the second would never be read
        ("zero padding", None, 4),
        ("missing", "missing_shard", 0),
    ],
)
def test_read_shard_never_loses_samples_without_an_error(tmp_path, how, kind, kept):
    path, data, spans, end = _tar(tmp_path)
    _damaged(path, data, spans, end, how)
    got = []
    if kind is None:
        got = list(read_shard(str(path)))
    else:
        with pytest.raises(ShardError) as err:
            got.extend(read_shard(str(path)))
        assert err.value.kind == kind and err.value.samples_read == kept and str(path) in str(err.value)
        assert isinstance(err.value, MissingShardError) == (kind == "missing_shard")
    assert ids(got) == names("understanding", range(kept))
    if how == "cut at a member boundary":
        with pytest.raises(SampleError, match="missing_key"):
            from_raw(got[-1])  # its json member is the one cut off: counted as a bad sample
        got = got[:-1]
    assert all(from_raw(r).id == r["__key__"] for r in got)


# -- resume across faults ------------------------------------------------------------------------------
def test_resume_goes_on_when_a_buffered_shard_has_disappeared(tmp_path, caplog):
    paths = write_shards(tmp_path / "gen", "generation", 40, 6)
    first = TaskStream("gen", paths, Slot(), 0, 8, shuffle_shards=False)
    it = iter(first)
    list(itertools.islice(it, 3))
    state = first.state_dict()
    assert {tuple(r)[1] for r in state["buffer"]} == {0, 1}  # buffered from shards 0 and 1
    Path(paths[1]).unlink()
    resumed = TaskStream("gen", paths, Slot(), 0, 8, shuffle_shards=False)
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(state)
    lost = sum(1 for r in state["buffer"] if r[1] == 1)
    assert resumed.stats["lost_buffered"] == lost > 0 and resumed.stats["missing_shard"] == 1
    assert "could not be re-read on resume" in caplog.text
    got = ids(itertools.islice(resumed, 20))
    assert len(set(got)) == 20 and not set(got) & set(names("generation", range(6, 12)))


def test_resume_with_a_changed_shard_list_restarts_the_epoch(tmp_path, caplog):
    paths = write_shards(tmp_path / "gen", "generation", 40, 6)
    first = TaskStream("gen", paths, Slot(), 0, 4, shuffle_shards=False)
    list(itertools.islice(iter(first), 10))
    state = first.state_dict()
    resumed = TaskStream("gen", paths[:-1], Slot(), 0, 4, shuffle_shards=False)
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(state)
    assert resumed.stats["shard_list_changed"] == 1
    assert resumed.stats["lost_buffered"] == len(state["buffer"]) == 3
    assert "shard list changed" in caplog.text
    assert (resumed.epoch, resumed.position, resumed.offset, resumed.buffer) == (0, 0, 0, [])


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_carries_the_fault_counters_and_the_dropped_tasks(model, shards, workers):
    tasks = {"understanding": (shards["understanding"], 3), "generation": (shards["generation"], 6),
             "text": (shards["text"], 1)}  # fmt: skip
    kw = dict(batch_size=3, shuffle_buffer=5, num_workers=workers, seed=4)
    reference, first, second = (make(model, tasks, **kw) for _ in range(3))  # same shard lists
    probe = TaskStream("understanding", first._tasks["understanding"].shards, Slot(), seed=4)
    und = probe.epoch_shards(0)[0]  # the first two of epoch 0: one for each worker when there are two
    Path(und[0]).unlink()
    os.truncate(und[1], Path(und[1]).stat().st_size // 2)
    shutil.rmtree(shards["generation"])
    ref_it = iter(reference.train_dataloader())
    expected = [next(ref_it)["ids"] for _ in range(12)]
    it = iter(first.train_dataloader())
    head = [next(it)["ids"] for _ in range(6)]
    state = first.state_dict()
    del it
    second.load_state_dict(state)
    it = iter(second.train_dataloader())
    assert head + [next(it)["ids"] for _ in range(6)] == expected
    stats = second.data_stats()
    assert stats == reference.data_stats()
    assert stats["dropped_task/generation"] == max(workers, 1) and stats["missing_shard/understanding"] >= 1
    assert stats["truncated_shard/understanding"] >= 1


# -- specs that match nothing at setup ----------------------------------------------------------------
def test_a_task_whose_specs_match_nothing_is_dropped_at_setup(model, shards, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    tasks = {"understanding": (shards["understanding"], 3), "generation": (tmp_path / "empty", 6),
             "text": (tmp_path / "text-*.tar", 1)}  # fmt: skip
    with caplog.at_level("WARNING"):
        dm = make(model, tasks, batch_size=4, shuffle_buffer=0)
    assert dm.ratios == {"understanding": 1.0}
    assert dm.data_stats() == {
        "missing_spec/generation": 1,
        "missing_spec/text": 1,
        "empty_task/generation": 1,
        "empty_task/text": 1,
    }
    assert "task 'generation' dropped" in caplog.text and str(tmp_path / "empty") in caplog.text
    assert "task 'text' dropped" in caplog.text and "text-*.tar" in caplog.text
    it = iter(dm.train_dataloader())
    assert {t for _ in range(5) for t in next(it)["tasks"]} == {"understanding"}
    assert dm.data_stats()["empty_task/text"] == 1


def test_a_partly_missing_spec_is_counted_and_the_task_kept(model, shards, tmp_path, caplog):
    dm = CheersDataModule(
        {
            "understanding": {"shards": [str(shards["understanding"]), str(tmp_path / "x-{0..2}.tar")]},
            "text": {"shards": [str(shards["text"])], "ratio": 3},
        }
    )
    with caplog.at_level("WARNING"):
        dm.attach(model.processor, model.image_size).setup()
    assert dm.data_stats() == {"missing_spec/understanding": 3}
    assert dm.ratios == {"understanding": 0.25, "text": 0.75}
    assert str(tmp_path / "x-1.tar") in caplog.text


def test_when_no_task_has_a_shard_setup_says_so_for_each(model, tmp_path):
    dm = CheersDataModule(
        {"understanding": {"shards": [str(tmp_path / "u-*.tar")]}, "text": {"shards": [str(tmp_path)]}}
    )
    with pytest.raises(FileNotFoundError, match=r"understanding: .*u-\*\.tar.*\| text: .*holds no \.tar"):
        dm.attach(model.processor, model.image_size).setup()


# -- a worker that dies --------------------------------------------------------------------------------
def _loader(model, clean):
    dm = make(model, {"understanding": (clean / "understanding", 1), "text": (clean / "text", 1)},
              batch_size=2, shuffle_buffer=0, num_workers=2)  # fmt: skip
    return dm.train_dataloader()


def test_a_worker_killed_between_batches_stops_the_run_with_a_resume_hint(model, clean, caplog):
    loader = _loader(model, clean)
    it = iter(loader)
    for _ in range(4):
        next(it)
    assert pickle.loads(pickle.dumps(it)) is None  # like a plain DataLoader iterator in Lightning's state
    victim = loader._iterator._workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    time.sleep(0.5)  # the SIGCHLD arrives here, outside any fetch: it must not raise here
    with pytest.raises(DataWorkerDiedError) as err:
        for _ in range(50):
            next(it)
    text = str(err.value)
    assert f"worker 1 of 2 (pid {victim.pid}) was killed by signal SIGKILL" in text
    assert "--ckpt_path last" in text and "last checkpoint" in text
    assert not any(w.is_alive() for w in loader._iterator._workers)  # the other one is stopped too
    with pytest.raises(DataWorkerDiedError, match="worker 1 of 2"):
        iter(loader)  # and the loader does not start again


def test_a_worker_killed_during_a_fetch_gives_the_same_error(model, clean):
    loader = _loader(model, clean)
    it = iter(loader)
    next(it)
    victim = loader._iterator._workers[0]
    threading.Timer(0.2, os.kill, (victim.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(DataWorkerDiedError, match=rf"worker 0 of 2 \(pid {victim.pid}\).*ckpt_path last"):
        while time.monotonic() - start < 30:
            next(it)


@pytest.mark.parametrize("buffer", [0, 3, 8])
def test_resume_at_every_point_of_short_epochs_is_exact(tmp_path, buffer):
    """Every cut, epoch ends and buffer drains included (found by the mixture fuzz test)."""
    paths = write_shards(tmp_path / "t", "text", 7, 4)  # 2 shards: 4 + 3 samples
    reference = ids(itertools.islice(TaskStream("t", paths, Slot(), 1, buffer), 40))
    for cut in range(25):
        first = TaskStream("t", paths, Slot(), 1, buffer)
        head = ids(itertools.islice(iter(first), cut))
        resumed = TaskStream("t", paths, Slot(), 1, buffer)
        resumed.load_state_dict(first.state_dict())
        assert head + ids(itertools.islice(resumed, 40 - cut)) == reference, cut


# -- a key that comes back later in its shard ----------------------------------------------------------
def test_a_non_adjacent_repeated_key_is_skipped_and_counted_per_shard(tmp_path, caplog):
    from tests.data.shardkit import raw_members, write_raw

    a, b, c = (raw_members(sample("generation", i)) for i in range(3))
    first = write_raw(tmp_path / "first.tar", [a, b, a, c, b])  # a and b come back
    second = write_raw(tmp_path / "second.tar", [a, c])  # another shard may hold the same keys
    assert ids(read_shard(first)) == names("generation", [0, 1, 2])
    stream = TaskStream("gen", [first, second], Slot(), 0, 0, shuffle_shards=False)
    with caplog.at_level("WARNING"):
        got = ids(itertools.islice(iter(stream), 5))
    assert got == names("generation", [0, 1, 2, 0, 2])
    assert stream.stats["duplicate_key"] == 2
    assert "repeats the key" in caplog.text and "first.tar" in caplog.text
    marked = [r for r in read_shard(first, start=3, mark_duplicates=True)]
    assert [(r["__index__"], r.get("__duplicate__", False)) for r in marked] == [(3, False), (4, True)]


def test_repeated_keys_reach_data_stats_and_resume_without_recounting(model, tmp_path):
    from tests.data.shardkit import raw_members, write_raw

    rows = [raw_members(sample("text", i)) for i in range(6)]
    path = write_raw(tmp_path / "t.tar", [*rows, rows[1], rows[4]])
    dm = make(model, {"text": (path, 1)}, batch_size=3, shuffle_buffer=0)
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):  # 6 unique samples, then the two repeats, then the next epoch
        next(it)
        loader.consumed()
    assert dm.data_stats()["duplicate_key/text"] == 2
    state = dm.state_dict()
    again = make(model, {"text": (path, 1)}, batch_size=3, shuffle_buffer=0)
    again.load_state_dict(state)
    next(iter(again.train_dataloader()))
    assert again.data_stats()["duplicate_key/text"] == 2
