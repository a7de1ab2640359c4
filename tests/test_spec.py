"""CheersSpec: derived sizes, size agreement checks, mode validation, presets."""

import pytest

from cheers_pl.spec import CheersSpec, ComponentSpec


def test_paper_sizes_are_derived_from_the_component_configs():
    r = CheersSpec.paper().resolve()
    assert (r.image_size, r.vae_downsample, r.latent_side) == (512, 16, 32)
    assert r.latent_channels == 128 and r.tokens_per_image == 256
    assert (r.cfm_head.width_a, r.cfm_head.width_b, r.cfm_head.out_channels) == (1536, 1152, 128)
    assert r.cfm_head.hfi == "gated" and r.cfm_head.stage_b_rope == "sequential"


def test_tiny_sizes():
    r = CheersSpec.tiny().resolve()
    assert (r.image_size, r.latent_side, r.tokens_per_image, r.latent_channels) == (32, 8, 16, 16)


def test_compat_released_switches_the_stage_b_rope_unless_set():
    assert CheersSpec.tiny(compat="released").resolve().cfm_head.stage_b_rope == "released"
    assert CheersSpec.tiny(compat="released", stage_b_rope="sequential").resolved_stage_b_rope == "sequential"


@pytest.mark.parametrize(
    ("part", "overrides", "message"),
    [
        ("cfm_head", {"width_b": 48}, "cfm_head.width_b=48 but semantic_encoder.hidden_size=32"),
        ("cfm_head", {"out_channels": 8}, "cfm_head.out_channels=8 but 4 x vae.latent_channels=16"),
        ("projector", {"llm_hidden": 32}, "projector.llm_hidden=32 but llm.hidden_size=64"),
        ("semantic_encoder", {"patch_size": 8}, "patch_size=8 but the VAE's downsample factor=4"),
        ("semantic_encoder", {"image_size": 20}, "token grid 5x5"),
    ],
)
def test_disagreeing_sizes_name_both_values(part, overrides, message):
    spec = CheersSpec.tiny(**{part: ComponentSpec("tiny", overrides=overrides)})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec.resolve()


@pytest.mark.parametrize(
    ("field", "value"),
    [("hfi", "on"), ("pixel_reconstruct", "pixels"), ("compat", "v1"), ("stage_b_rope", "2d")],
)
def test_unknown_modes_list_the_valid_choices(field, value):
    with pytest.raises(ValueError, match=rf"{field}='{value}' is not valid; choose one of \["):
        CheersSpec.tiny(**{field: value})


def test_components_may_come_as_plain_dicts():
    spec = CheersSpec(llm={"flavor": "tiny", "overrides": {"num_hidden_layers": 1}})
    assert isinstance(spec.llm, ComponentSpec) and spec.llm.overrides == {"num_hidden_layers": 1}


def test_bad_numbers():
    with pytest.raises(ValueError, match="cfg_dropout"):
        CheersSpec.tiny(cfg_dropout=1.5)
    with pytest.raises(ValueError, match="fm_weight"):
        CheersSpec.tiny(fm_weight=-1)
