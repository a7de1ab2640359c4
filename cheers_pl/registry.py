"""The component registry: ``{kind: FLAVORS}`` imported explicitly, and ``build(kind, flavor, **overrides)``.

Each component file ends with a ``FLAVORS`` dict of :class:`~cheers_pl.components.flavor.Flavor`
(``"tiny"``, ``"paper"``, ``"pretrained"``, ...). Nothing registers itself on import: this file is
the whole list. An unknown kind or flavor fails naming the valid ones.
"""

from __future__ import annotations

from typing import Any

from cheers_pl.components import (
    cfm_head,
    llm,
    pixel_decoder,
    projector,
    semantic_encoder,
    time_embed,
    tokenizer,
    vae,
)
from cheers_pl.components.flavor import Flavor

COMPONENTS: dict[str, dict[str, Flavor]] = {
    "vae": vae.FLAVORS,
    "pixel_decoder": pixel_decoder.FLAVORS,
    "semantic_encoder": semantic_encoder.FLAVORS,
    "projector": projector.FLAVORS,
    "llm": llm.FLAVORS,
    "time_embed": time_embed.FLAVORS,
    "cfm_head": cfm_head.FLAVORS,
    "tokenizer": tokenizer.FLAVORS,
}


def kinds() -> list[str]:
    """The registered component kinds."""
    return sorted(COMPONENTS)


def flavors(kind: str) -> list[str]:
    """The flavors of ``kind``; raises ``KeyError`` naming the valid kinds."""
    if kind not in COMPONENTS:
        raise KeyError(f"unknown component kind {kind!r}; valid kinds are {kinds()}")
    return list(COMPONENTS[kind])


def get(kind: str, flavor: str) -> Flavor:
    """The :class:`Flavor` ``kind/flavor``; raises ``KeyError`` naming the valid choices."""
    table = COMPONENTS.get(kind)
    if table is None:
        raise KeyError(f"unknown component kind {kind!r}; valid kinds are {kinds()}")
    if flavor not in table:
        raise KeyError(f"unknown {kind} flavor {flavor!r}; valid flavors are {list(table)}")
    return table[flavor]


def config(kind: str, flavor: str, **overrides: Any) -> Any:
    """The component's config, cheap (no weights): a library config class or a dataclass."""
    return get(kind, flavor).config(**overrides)


def build(kind: str, flavor: str, **overrides: Any) -> Any:
    """Build ``kind`` in ``flavor`` with ``overrides`` applied to its config."""
    return get(kind, flavor)(**overrides)
