"""The registry: every kind has a tiny flavor that builds; unknown names list the valid ones."""

import pytest
from torch import nn

from cheers_pl import registry


def test_kinds_and_flavors():
    assert registry.kinds() == sorted(
        [
            "vae",
            "pixel_decoder",
            "semantic_encoder",
            "projector",
            "llm",
            "time_embed",
            "cfm_head",
            "tokenizer",
        ]
    )
    for kind in registry.kinds():
        assert {"tiny", "paper"} <= set(registry.flavors(kind)), kind


@pytest.mark.parametrize("kind", registry.kinds())
def test_every_tiny_flavor_builds(kind):
    built = registry.build(kind, "tiny")
    if kind == "tokenizer":
        assert len(built) < 1000
    else:
        assert isinstance(built, nn.Module) and sum(p.numel() for p in built.parameters()) > 0


def test_unknown_names_list_the_choices():
    with pytest.raises(KeyError, match=r"valid kinds are \["):
        registry.build("unet", "tiny")
    with pytest.raises(
        KeyError, match=r"unknown llm flavor 'huge'; valid flavors are \['tiny', 'paper', 'pretrained'\]"
    ):
        registry.build("llm", "huge")
    with pytest.raises(KeyError, match="valid kinds"):
        registry.flavors("unet")


def test_nothing_registers_itself():
    """The registry is the explicit dict in registry.py: each entry is a component file's FLAVORS."""
    from cheers_pl.components import cfm_head, llm

    assert registry.COMPONENTS["llm"] is llm.FLAVORS and registry.COMPONENTS["cfm_head"] is cfm_head.FLAVORS
