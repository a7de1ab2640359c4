"""``freeze``: modules kept fixed on top of what a stage trains; a stage that trains nothing fails early."""

from __future__ import annotations

import pytest

from cheers_pl.model import CheersModel
from cheers_pl.spec import CheersSpec
from cheers_pl.stages import AlignmentStage, PretrainStage
from cheers_pl.stages.freezing import FREEZABLE, apply_freeze, check_freeze, trained_modules

TINY = CheersSpec.tiny()
LATENT = CheersSpec.tiny(pixel_reconstruct="latent")
CHOICES = r"valid choices are \['llm', 'semantic_encoder', 'pixel_decoder', 'projector', 'cfm_head'\]"


@pytest.fixture(scope="module")
def model():
    return CheersModel(TINY)


def test_freezable_names_are_the_models_top_level_modules(model):
    children = dict(model.named_children())
    assert set(FREEZABLE) <= set(children) and set(children) - set(FREEZABLE) == {"vae"}


def test_check_freeze_keeps_valid_lists_in_a_fixed_order():
    assert check_freeze(None, "all", TINY) == ()
    assert check_freeze([], "new", TINY) == ()
    assert check_freeze(["cfm_head", "llm", "llm"], "all", TINY) == ("llm", "cfm_head")
    assert check_freeze(["llm", "semantic_encoder", "pixel_decoder"], "new", TINY) == (
        "llm", "semantic_encoder", "pixel_decoder"
    )  # fmt: skip
    assert check_freeze(["projector"], "new", TINY) == ("projector",)


@pytest.mark.parametrize(
    ("freeze", "extra"), [(["lm"], ""), (["vae"], "the VAE is always frozen"), ("llm", "")]
)
def test_unknown_names_list_the_valid_choices(freeze, extra):
    with pytest.raises(ValueError, match=CHOICES) as err:
        check_freeze(freeze, "all", TINY)
    assert extra in str(err.value)


def test_a_module_the_spec_lacks_is_refused():
    with pytest.raises(ValueError, match=r"\['pixel_decoder'\] not in this model .*'latent'.*valid choices"):
        check_freeze(["pixel_decoder"], "all", LATENT)


@pytest.mark.parametrize(
    ("freeze", "trains", "spec"),
    [
        (["projector", "cfm_head"], "new", TINY),  # stage I: only its token rows would be left
        (["cfm_head", "projector", "llm"], "new", TINY),
        (list(FREEZABLE), "all", TINY),  # stages II-IV: all five
        (["llm", "semantic_encoder", "projector", "cfm_head"], "all", LATENT),  # no pixel decoder there
        (["projector", "cfm_head", "semantic_encoder"], "new", LATENT),  # its latent patch embedding
    ],
)
def test_a_freeze_list_that_leaves_nothing_to_train_is_refused(freeze, trains, spec):
    with pytest.raises(ValueError, match=rf"trains nothing.*trains={trains!r} trains \["):
        check_freeze(freeze, trains, spec)


def test_what_each_stage_trains():
    assert trained_modules("new", TINY) == ("projector", "cfm_head")
    assert trained_modules("new", LATENT) == ("projector", "cfm_head", "semantic_encoder")
    assert trained_modules("all", TINY) == FREEZABLE
    assert "pixel_decoder" not in trained_modules("all", LATENT)
    assert check_freeze(["projector", "cfm_head"], "new", LATENT) == ("projector", "cfm_head")
    with pytest.raises(ValueError, match=r"valid choices are \['new', 'all'\]"):
        trained_modules("some", TINY)


def test_apply_freeze_fixes_exactly_the_named_modules(model):
    model.requires_grad_(True)
    apply_freeze(model, ("llm", "projector"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("llm.", "projector."))}
    with pytest.raises(ValueError, match=CHOICES):
        apply_freeze(model, ["vae"])


def trainable(module):
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_stages_apply_their_freeze_list():  # needs CheersModule(freeze=...) (cheers_pl/stages/base.py)
    stage2 = PretrainStage(spec=TINY, freeze=["llm", "semantic_encoder"])
    stage2.configure_model()
    assert trainable(stage2) and not any(
        n.startswith(("llm.", "semantic_encoder.")) for n in trainable(stage2)
    )
    assert any(n.startswith("pixel_decoder.") for n in trainable(stage2))
    stage1 = AlignmentStage(spec=TINY, freeze=["projector"])
    stage1.configure_model()
    assert {n.split(".")[0] for n in trainable(stage1)} == {"cfm_head", "llm"}  # llm: the token rows
    with pytest.raises(ValueError, match="trains nothing"):
        AlignmentStage(spec=TINY, freeze=["projector", "cfm_head"])
