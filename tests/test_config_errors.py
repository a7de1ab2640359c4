"""Bad configs fail at parse time, through the real `cheers fit -c stage.yaml -c tiny.yaml -c bad.yaml` path.

Each case is an overlay a user could write. The error must come before any weight is allocated
or any data is read (``configure_model`` and ``setup`` are replaced by a tripwire), it must name
the offending key (and the valid choices where there is a set), and it must be the error the
kit raised, not jsonargparse's "does not validate against any Union subtype" report around it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from cheers_pl.cli import main
from cheers_pl.data.datamodule import CheersDataModule
from cheers_pl.stages.base import CheersModule

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
STAGES = {"stage1": "stage1_alignment.yaml", "stage2": "stage2_pretrain.yaml"}


class RunStarted(AssertionError):
    """Raised by the tripwire: the run got past parsing and construction."""


@pytest.fixture(autouse=True)
def tripwire(monkeypatch):
    def started(*args, **kwargs):
        raise RunStarted("the run started: the bad config was not refused at parse time")

    monkeypatch.setattr(CheersModule, "configure_model", started)
    monkeypatch.setattr(CheersDataModule, "setup", started)


def fit(tmp_path: Path, overlay: dict, *extra: str, stage: str = "stage1") -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    args = [
        "fit",
        "-c",
        str(EXPERIMENTS / STAGES[stage]),
        "-c",
        str(EXPERIMENTS / "tiny.yaml"),
        "-c",
        str(bad),
    ]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), *extra]
    if stage != "stage1":
        args += ["--model.init_args.init_from", "null"]  # no stage-I checkpoint here
    main(args)


def refused(tmp_path, overlay, *extra, stage="stage1", error=ValueError) -> str:
    """The message of the error the overlay raises at construction (the kit's own, unwrapped)."""
    with pytest.raises(error) as err:
        fit(tmp_path, overlay, *extra, stage=stage)
    text = err.value.args[0] if isinstance(err.value, KeyError) else str(err.value)
    assert "Does not validate against any of the Union subtypes" not in text
    return text


def parse_error(tmp_path, overlay, capsys, *extra, stage="stage1") -> str:
    """stderr of a parse error (jsonargparse exits with 2)."""
    with pytest.raises(SystemExit) as exit_:
        fit(tmp_path, overlay, *extra, stage=stage)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def model(**init_args):
    return {"model": {"init_args": init_args}}


def spec(**fields):
    return model(spec=fields)


def override(part, **overrides):
    return spec(**{part: {"flavor": "tiny", "overrides": overrides}})


def tasks(**entries):
    return {"data": {"tasks": entries}}


def assert_has(text: str, *parts: str) -> None:
    for part in parts:
        assert part in text, f"{part!r} not in:\n{text}"


# -- 1. unknown keys -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (model(lr_typo=1), ["'lr_typo' is not a key of cheers_pl.stages.AlignmentStage", "'lr', "]),
        ({"trainer": {"max_stepz": 3}}, ["trainer.max_stepz", "did you mean 'trainer.max_steps'"]),
        ({"data": {"batch_sise": 2}}, ["data.batch_sise", "did you mean 'data.batch_size'"]),
        (spec(hfii="gated"), ["'hfii' is not a key of cheers_pl.spec.CheersSpec", "did you mean 'hfi'"]),
        (
            spec(llm={"flavour": "tiny"}),
            ["llm.flavour", "did you mean 'llm.flavor'", "['flavor', 'overrides', 'path']"],
        ),
    ],
    ids=[
        "model.lr_typo",
        "trainer.max_stepz",
        "data.batch_sise",
        "spec.hfii",
        "llm.flavour",
    ],
)
def test_unknown_keys_name_the_key_and_the_valid_ones(tmp_path, capsys, overlay, expected):
    err = parse_error(tmp_path, overlay, capsys)
    assert_has(err, *expected)
    assert "Valid keys" in err


def test_unknown_component_override_lists_the_valid_keys(tmp_path):
    text = refused(tmp_path, override("llm", hiden_size=3))
    assert_has(text, "unknown override(s) ['hiden_size']", "valid keys are [", "'hidden_size'")


def test_unknown_key_in_a_task_lists_the_valid_keys(tmp_path):
    text = refused(tmp_path, tasks(generation={"shards": ["generation/"], "ratioo": 1}), stage="stage2")
    assert_has(text, "tasks.generation", "'ratioo'", "valid keys are ['shards', 'ratio']")


def test_unknown_task_lists_the_valid_tasks(tmp_path):
    text = refused(tmp_path, tasks(genration={"shards": ["generation/"], "ratio": 1}))
    assert_has(text, "tasks.genration", "valid tasks are ['understanding', 'generation', 'text', 'edit']")


# -- 2. wrong types --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (model(lr="fast"), ['Parser key "lr"', "fast"]),
        ({"trainer": {"max_steps": "ten"}}, ['Parser key "trainer.max_steps"', "ten"]),
        (spec(hfi=3), ['Parser key "hfi"', "Expected a <class 'str'>"]),
    ],
    ids=["lr", "trainer.max_steps", "spec.hfi"],
)
def test_wrong_types_are_parse_errors_naming_the_key(tmp_path, capsys, overlay, expected):
    assert_has(parse_error(tmp_path, overlay, capsys), *expected)


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (tasks(generation={"shards": ["generation/"], "ratio": [1]}), "tasks.generation.ratio=[1] must be a"),
        (tasks(generation={"shards": ["generation/"], "ratio": math.nan}), "tasks.generation.ratio=nan must"),
        (
            tasks(generation={"shards": "generation/", "ratio": 1}),
            "tasks.generation.shards='generation/' must",
        ),
        (override("llm", hidden_size="big"), "spec.llm.overrides.hidden_size='big' has the wrong type"),
        (spec(max_length=0), "spec.max_length=0 must be >= 1"),
    ],
    ids=["ratio-list", "ratio-nan", "shards-string", "override-str", "max_length"],
)
def test_wrong_types_of_values_the_parser_cannot_check(tmp_path, overlay, expected):
    assert expected in refused(tmp_path, overlay)


# -- 3. invalid choices ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (spec(hfi="banana"), "spec.hfi='banana' is not valid; choose one of ['gated', 'none']"),
        (
            spec(pixel_reconstruct="pixels"),
            "spec.pixel_reconstruct='pixels' is not valid; choose one of ['decode'",
        ),
        (spec(compat="v9"), "spec.compat='v9' is not valid; choose one of ['kit', 'released']"),
        (
            spec(stage_b_rope="2d"),
            "spec.stage_b_rope='2d' is not valid; choose one of ['released', 'sequential']",
        ),
        (
            spec(fm_loss_images="some"),
            "spec.fm_loss_images='some' is not valid; choose one of ['generation', 'all', 'every_image']",
        ),
        (model(schedule="linear"), "schedule='linear'; valid choices are ['constant', 'cosine']"),
        (
            {"data": {"mixture": "round-robin"}},
            "mixture='round-robin' is not valid; valid choices are ['sample'",
        ),
    ],
    ids=["hfi", "pixel_reconstruct", "compat", "stage_b_rope", "fm_loss_images", "schedule", "mixture"],
)
def test_invalid_choices_list_the_valid_ones(tmp_path, overlay, expected):
    assert expected in refused(tmp_path, overlay)


@pytest.mark.parametrize("part", ["llm", "vae"])
def test_unknown_flavors_list_the_registered_ones(tmp_path, part):
    from cheers_pl import registry

    text = refused(tmp_path, spec(**{part: {"flavor": "huge"}}), error=KeyError)
    assert f"unknown {part} flavor 'huge'; valid flavors are {registry.flavors(part)}" in text


def test_unknown_stage_class_lists_the_stages(tmp_path, capsys):
    err = parse_error(tmp_path, {"model": {"class_path": "cheers_pl.stages.FinetuneStage"}}, capsys)
    assert_has(
        err, "cheers_pl.stages.FinetuneStage", "valid stages are [", "'cheers_pl.stages.AlignmentStage'"
    )


# -- 4. sizes that disagree ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (override("llm", hidden_size=128), ["projector.llm_hidden=64 but llm.hidden_size=128"]),
        (override("cfm_head", width_a=32), ["cfm_head.width_a=32 but llm.hidden_size=64"]),
        (
            override("projector", vision_hidden=48),
            ["projector.vision_hidden=48 but semantic_encoder.hidden_size=32"],
        ),
        (
            override("semantic_encoder", patch_size=8),
            ["semantic_encoder.patch_size=8 but the VAE's downsample factor=4", "vae.block_out_channels"],
        ),
        (override("vae", latent_channels=8), ["cfm_head.out_channels=16 but 4 x vae.latent_channels=32"]),
    ],
    ids=[
        "llm-vs-projector",
        "llm-vs-head",
        "vit-vs-projector",
        "patch-vs-vae",
        "vae-vs-head",
    ],
)
def test_disagreeing_sizes_name_both_keys_and_values(tmp_path, overlay, expected):
    text = refused(tmp_path, overlay)
    assert text.startswith("spec sizes disagree")
    assert_has(text, *expected)


# -- 5. mixture ratios -----------------------------------------------------------------------------
def three(und=3, gen=6, text=1, gen_shards=("generation/",)):
    return tasks(
        understanding={"shards": ["understanding/"], "ratio": und},
        generation={"shards": list(gen_shards), "ratio": gen},
        text={"shards": ["text/"], "ratio": text},
    )


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (three(gen=-1), "tasks.generation.ratio=-1 is negative"),
        (three(0, 0, 0), "tasks: all ratios are zero ("),
        (three(gen_shards=()), "tasks.generation.shards is empty but its ratio is 6"),
    ],
    ids=["negative", "all-zero", "ratio-without-shards"],
)
def test_bad_mixture_ratios(tmp_path, overlay, expected):
    assert expected in refused(tmp_path, overlay, stage="stage2")


def test_a_zero_ratio_task_without_shards_is_fine(tmp_path):
    with pytest.raises(RunStarted):  # parses and constructs; the tripwire then stops the run
        fit(tmp_path, three(gen=0, gen_shards=()), stage="stage2")


# -- 6. a stage that trains nothing ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "freeze"),
    [
        ("stage1", "[projector, cfm_head]"),
        ("stage2", "[llm, semantic_encoder, pixel_decoder, projector, cfm_head]"),
    ],
)
def test_a_stage_that_trains_nothing_is_refused(tmp_path, stage, freeze):
    text = refused(tmp_path, {}, "--model.init_args.freeze", freeze, stage=stage)
    assert_has(text, "freeze=", "trains nothing")


def test_unknown_freeze_names_list_the_choices(tmp_path):
    text = refused(tmp_path, {}, "--model.init_args.freeze", "[lm]")
    assert re.search(
        r"freeze: unknown module\(s\) \['lm'\]; valid choices are \['llm', 'semantic_encoder'", text
    )


# -- data.image_size vs the model (issue 14, item 7) -----------------------------------------------
def test_a_data_image_size_other_than_the_models_is_a_parse_error(tmp_path, capsys):
    err = parse_error(tmp_path, {"data": {"image_size": 64}}, capsys)
    assert_has(err, "data.image_size=64 but the model's image size is 32", "drop data.image_size")


def test_a_data_image_size_equal_to_the_models_is_fine(tmp_path):
    with pytest.raises(RunStarted):
        fit(tmp_path, {"data": {"image_size": 32}, "trainer": {"max_steps": 1}})
