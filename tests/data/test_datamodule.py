"""The DataModule: model-ready mixed batches, ratios, preprocessing, bad samples, exact resume."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from cheers_pl.components.processor import CheersProcessor
from cheers_pl.data.datamodule import CheersDataModule
from cheers_pl.model import CheersModel
from cheers_pl.spec import CheersSpec
from tests.data.shardkit import png, raw_members, sample, write_raw, write_shards


@pytest.fixture(scope="module")
def model():
    return CheersModel(CheersSpec.tiny())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {
        t: str(root / t) for t in ("understanding", "generation", "text") if write_shards(root / t, t, 60, 8)
    }


def make(model, tasks, **kw):
    dm = CheersDataModule(tasks, **kw)
    dm.attach(model.processor, model.image_size)
    dm.setup()
    return dm


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batches_are_model_ready(model, shards):
    dm = make(
        model, {t: {"shards": [p], "ratio": 1} for t, p in shards.items()}, batch_size=4, shuffle_buffer=4
    )
    for batch in take(dm.train_dataloader(), 3):
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        n_img = sum(t != "text" for t in batch["tasks"])
        assert batch.get("images", torch.zeros(0)).shape[0] == n_img
        out = model(batch)
        assert torch.isfinite(out.loss)


def test_per_sample_ratios_3_6_1(model, shards):
    tasks = {"understanding": {"shards": [shards["understanding"]], "ratio": 3},
             "generation": {"shards": [shards["generation"]], "ratio": 6},
             "text": {"shards": [shards["text"]], "ratio": 1}}  # fmt: skip
    dm = make(model, tasks, batch_size=10, shuffle_buffer=0)
    counts = Counter(t for b in take(dm.train_dataloader(), 60) for t in b["tasks"])
    total = sum(counts.values())
    for task, p in (("understanding", 0.3), ("generation", 0.6), ("text", 0.1)):
        sd = (p * (1 - p) / total) ** 0.5
        assert abs(counts[task] / total - p) < 4 * sd, counts


def test_per_batch_mixture_gives_single_task_batches_1_to_1(model, shards):
    tasks = {"understanding": {"shards": [shards["understanding"]], "ratio": 1},
             "generation": {"shards": [shards["generation"]], "ratio": 1}}  # fmt: skip
    batches = take(
        make(model, tasks, mixture="batch", batch_size=3, shuffle_buffer=0).train_dataloader(), 200
    )
    kinds = Counter()
    for b in batches:
        assert len(set(b["tasks"])) == 1
        kinds[b["tasks"][0]] += 1
    assert abs(kinds["understanding"] - 100) < 4 * 50**0.5


def test_preprocessing_pads_understanding_and_crops_generation(model, tmp_path):
    wide = Image.new("RGB", (64, 32), (255, 255, 255))
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    und, gen = sample("understanding", 0), sample("generation", 0)
    und.images, gen.images = [buf.getvalue()], [buf.getvalue()]
    path_u = write_raw(tmp_path / "u.tar", [raw_members(und)])
    path_g = write_raw(tmp_path / "g.tar", [raw_members(gen)])
    img_u = take(make(model, {"understanding": {"shards": [path_u]}}, batch_size=1).train_dataloader(), 1)[0]
    img_g = take(make(model, {"generation": {"shards": [path_g]}}, batch_size=1).train_dataloader(), 1)[0]
    u, g = img_u["images"][0], img_g["images"][0]
    assert u.shape == g.shape == (3, 32, 32)
    assert float(u[:, 0].max()) == 0.0 and float(u[:, 16].min()) == 1.0  # padded rows above, picture below
    assert float(g.min()) == 1.0  # crop: no padding


def test_cfg_dropout_nulls_about_a_fifth_of_generation_prompts(model, shards):
    dm = make(model, {"generation": {"shards": [shards["generation"]]}}, batch_size=10, shuffle_buffer=0)
    batches = take(dm.train_dataloader(), 30)
    drops = [d for b in batches for d in b["cfg_drop"]]
    assert 0.12 < sum(drops) / len(drops) < 0.28
    p: CheersProcessor = model.processor
    b = next(b for b in batches if any(b["cfg_drop"]))
    row = b["input_ids"][b["cfg_drop"].index(True)]
    real = row[b["attention_mask"][b["cfg_drop"].index(True)]]
    allowed = {p.null_id, p.image_gen_id, p.im_start_id, p.im_end_id}
    assert set(real.tolist()) <= allowed


def test_bad_samples_are_skipped_counted_and_the_run_goes_on(model, tmp_path, caplog):
    good = [raw_members(sample("understanding", i)) for i in range(6)]
    bad_json = {**good[0], "__key__": "badjson", "json": b"{oops"}
    no_json = {"__key__": "nojson", "img0.png": png(1)}
    corrupt = {**good[1], "__key__": "corrupt", "img0.png": b"\x89PNG not really"}
    rec = json.loads(good[2]["json"])
    rec["messages"][0]["content"] = "<image><image>\ntwo?"
    mismatch = {**good[2], "__key__": "mismatch", "json": json.dumps(rec).encode()}
    rec = json.loads(good[3]["json"])
    rec["messages"][1]["content"] = ""
    empty = {**good[3], "__key__": "empty", "json": json.dumps(rec).encode()}
    cmyk = io.BytesIO()
    Image.new("CMYK", (10, 10), (0, 255, 0, 0)).save(cmyk, format="JPEG")
    repaired = {**good[4], "__key__": "cmyk", "img0.png": cmyk.getvalue()}  # a JPEG named .png, in CMYK
    path = write_raw(tmp_path / "mixed.tar", [bad_json, no_json, corrupt, mismatch, empty, repaired, good[5]])
    dm = make(model, {"understanding": {"shards": [path]}}, batch_size=2, shuffle_buffer=0)
    with caplog.at_level("WARNING"):
        batch = take(dm.train_dataloader(), 1)[0]
    assert [i.split("-")[0] for i in batch["ids"]] == ["understanding", "understanding"]
    assert batch["images"].shape == (2, 3, 32, 32)
    stats = dm.data_stats()
    for reason in ("bad_json", "missing_key", "corrupt_image", "marker_mismatch", "empty_text"):
        assert stats[f"skipped/understanding/{reason}"] == 1, (reason, stats)
    assert stats["repaired/mode:CMYK"] == 1
    assert "corrupt" in caplog.text and "mixed.tar" in caplog.text


def test_too_long_samples_are_skipped_and_an_all_unusable_task_stops_with_a_message(model, tmp_path, shards):
    short = [raw_members(sample("text", i)) for i in range(3)]
    long = sample("text", 9)
    long.messages[1]["content"] = "word " * 200
    path = write_raw(tmp_path / "text.tar", [short[0], raw_members(long), short[1], short[2]])
    proc = CheersProcessor(model.processor.tokenizer, model.tokens_per_image, max_length=60)
    dm = CheersDataModule({"text": {"shards": [path]}}, batch_size=3, shuffle_buffer=0)
    dm.attach(proc, model.image_size).setup()
    batch = take(dm.train_dataloader(), 1)[0]
    assert batch["ids"] == ["text-0000", "text-0001", "text-0002"]
    assert dm.data_stats()["skipped/text/too_long"] == 1
    tiny = CheersProcessor(model.processor.tokenizer, model.tokens_per_image, max_length=10)
    dm = CheersDataModule(
        {"understanding": {"shards": [shards["understanding"]]}}, batch_size=1, shuffle_buffer=0
    )
    dm.attach(tiny, model.image_size).setup()
    with pytest.raises(RuntimeError, match="'understanding'.*unusable.*too_long"):
        take(dm.train_dataloader(), 1)


def test_too_long_truncate_cuts_text_after_the_image_and_still_skips_what_cannot_fit(model, tmp_path):
    caption = sample("understanding", 1)
    caption.messages[1]["content"] = "word " * 300
    prompt = sample("generation", 2)
    prompt.messages[0]["content"] = "word " * 300  # its image comes after the long prompt
    rows = [caption, prompt, sample("understanding", 3), sample("understanding", 4)]
    path = write_raw(tmp_path / "mixed.tar", [raw_members(s) for s in rows])
    proc = CheersProcessor(model.processor.tokenizer, model.tokens_per_image, max_length=80)
    dm = CheersDataModule(
        {"understanding": {"shards": [path]}}, batch_size=3, shuffle_buffer=0, too_long="truncate"
    )
    dm.attach(proc, model.image_size).setup()
    batch = take(dm.train_dataloader(), 1)[0]
    assert batch["ids"] == ["understanding-0001", "understanding-0003", "understanding-0004"]
    assert batch["input_ids"].shape[1] == 80 and batch["images"].shape[0] == 3
    assert (batch["input_ids"] == proc.image_id).sum() == 3 * model.tokens_per_image
    stats = dm.data_stats()
    assert stats["repaired/truncated"] == 1 and stats["skipped/understanding/too_long"] == 1
    assert torch.isfinite(model(batch).loss)


def test_a_null_max_length_still_skips_a_100k_character_sample(model, tmp_path, caplog):
    long = sample("text", 9)
    long.messages[1]["content"] = "lorem ipsum " * 8400  # 100k characters: > MAX_LENGTH_CEILING tokens
    path = write_raw(
        tmp_path / "text.tar", [raw_members(long), *(raw_members(sample("text", i)) for i in range(2))]
    )
    assert model.processor.max_length is None
    dm = CheersDataModule({"text": {"shards": [path]}}, batch_size=2, shuffle_buffer=0)
    with caplog.at_level("WARNING"):
        dm.attach(model.processor, model.image_size).setup()
    assert "spec.max_length is null" in caplog.text
    assert take(dm.train_dataloader(), 1)[0]["ids"] == ["text-0000", "text-0001"]
    assert dm.data_stats()["skipped/text/too_long"] == 1


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [1, 7])
def test_resume_sees_exactly_the_next_samples(model, shards, workers, cut):
    tasks = {t: {"shards": [p], "ratio": r} for (t, p), r in zip(shards.items(), (3, 6, 1), strict=True)}
    kw = dict(batch_size=3, shuffle_buffer=5, num_workers=workers, seed=4)
    reference = [b["ids"] for b in take(make(model, tasks, **kw).train_dataloader(), cut + 6)]
    first = make(model, tasks, **kw)
    it = iter(first.train_dataloader())
    head = [next(it)["ids"] for _ in range(cut)]
    state = first.state_dict()
    del it
    second = make(model, tasks, **kw)
    second.load_state_dict(state)
    tail = [b["ids"] for b in take(second.train_dataloader(), 6)]
    assert head + tail == reference


def test_state_for_another_world_size_is_refused(model, shards):
    dm = make(model, {"text": {"shards": [shards["text"]]}}, batch_size=2)
    take(dm.train_dataloader(), 1)
    state = dm.state_dict()
    state["world_size"] = 2
    dm2 = make(model, {"text": {"shards": [shards["text"]]}}, batch_size=2)
    with pytest.raises(RuntimeError, match="saved with 2 ranks"):
        dm2.load_state_dict(state)
        dm2.train_dataloader()


@pytest.mark.parametrize(
    ("tasks", "kw", "message"),
    [
        ({"text": {"shards": ["x.tar"], "ratio": -1}}, {}, "tasks.text.ratio=-1"),
        ({"text": {"shards": ["x.tar"], "ratio": 0}}, {}, "all ratios are zero"),
        ({"text": {"shards": [], "ratio": 1}}, {}, "tasks.text.shards is empty"),
        (
            {"text": {"shards": ["x.tar"]}},
            {"mixture": "round-robin"},
            r"valid choices are \['sample', 'batch'\]",
        ),
        ({"text": {"shards": ["x.tar"]}}, {"batch_size": 0}, "batch_size=0"),
        ({"text": {"shards": ["x.tar"]}}, {"cfg_dropout": 2.0}, r"data.cfg_dropout=2.0 .*in \[0, 1\]"),
        ({"text": {"shards": ["x.tar"]}}, {"cfg_dropout": -0.1}, r"data.cfg_dropout=-0.1 .*in \[0, 1\]"),
        ({"text": {"shards": ["x.tar"]}}, {"cfg_dropout": float("nan")}, r"data.cfg_dropout=nan"),
        ({"text": {"shards": ["x.tar"]}}, {"shuffle_buffer": -5}, r"data.shuffle_buffer=-5 .*int >= 0"),
        ({"text": {"shards": ["x.tar"]}}, {"shuffle_buffer": 2.5}, r"data.shuffle_buffer=2.5 .*int >= 0"),
        ({"text": {"shards": ["x.tar"]}}, {"too_long": "cut"}, r"valid choices are \['skip', 'truncate'\]"),
    ],
)
def test_bad_configs_fail_at_construction(tasks, kw, message):
    with pytest.raises(ValueError, match=message):
        CheersDataModule(tasks, **kw)


def test_shard_specs_that_match_nothing_fail_at_setup(model, tmp_path):
    dm = CheersDataModule({"text": {"shards": [str(tmp_path / "none-*.tar")]}})
    dm.attach(model.processor, model.image_size)
    with pytest.raises(FileNotFoundError, match="none-"):
        dm.setup()


def test_images_are_in_unit_range(model, shards):
    b = take(
        make(
            model, {"understanding": {"shards": [shards["understanding"]]}}, batch_size=2
        ).train_dataloader(),
        1,
    )
    arr = b[0]["images"].numpy()
    assert arr.min() >= 0 and arr.max() <= 1 and np.unique(arr).size > 10
