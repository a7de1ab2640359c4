"""Freezing whole modules of a :class:`~cheers_pl.model.CheersModel` on top of what a stage trains.

A stage's ``freeze: [llm, semantic_encoder]`` keeps those modules fixed (``requires_grad=False``)
after the stage has set what it trains. The names are checked when the stage is constructed (at
config parse time, before any weight exists): an unknown or absent module, or a list that leaves
the stage nothing to train, fails naming the valid choices.

What each stage trains (``CheersModule.trains``):

* ``"new"`` (stage I): the projector and the CFM head (plus the embedding rows of the added
  tokens, which alone are not a training run; and SigLIP's latent patch embedding in the
  ``pixel_reconstruct: latent`` ablation);
* ``"all"`` (stages II-IV): every module but the VAE, which is always frozen.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from cheers_pl.spec import CheersSpec

FREEZABLE = ("llm", "semantic_encoder", "pixel_decoder", "projector", "cfm_head")


def present_modules(spec: CheersSpec) -> tuple[str, ...]:
    """The freezable modules a model of ``spec`` has (the latent ablation has no pixel decoder)."""
    return tuple(n for n in FREEZABLE if not (n == "pixel_decoder" and spec.pixel_reconstruct == "latent"))


def trained_modules(trains: str, spec: CheersSpec) -> tuple[str, ...]:
    """The modules a stage with ``trains`` ("new" or "all") trains, before any ``freeze``."""
    if trains == "new":
        new = ("projector", "cfm_head")
        return new + (("semantic_encoder",) if spec.pixel_reconstruct == "latent" else ())
    if trains == "all":
        return present_modules(spec)
    raise ValueError(f"trains={trains!r} is not valid; valid choices are ['new', 'all']")


def check_freeze(freeze: Iterable[str] | None, trains: str, spec: CheersSpec) -> tuple[str, ...]:
    """The module names of ``freeze`` (in :data:`FREEZABLE` order, once each), checked.

    Raises ``ValueError`` naming the valid choices for an unknown name or one this spec's model
    lacks, and for a list that freezes everything the stage trains.
    """
    if freeze is None:
        return ()
    if isinstance(freeze, str) or not isinstance(freeze, Iterable):
        raise ValueError(
            f"freeze={freeze!r} must be a list of module names; valid choices are {list(FREEZABLE)}"
        )
    names = list(freeze)
    unknown = [n for n in names if n not in FREEZABLE]
    if unknown:
        why = " (the VAE is always frozen)" if "vae" in unknown else ""
        raise ValueError(f"freeze: unknown module(s) {unknown}{why}; valid choices are {list(FREEZABLE)}")
    present = present_modules(spec)
    absent = [n for n in names if n not in present]
    if absent:
        raise ValueError(
            f"freeze: {absent} not in this model (spec.pixel_reconstruct={spec.pixel_reconstruct!r}); "
            f"valid choices are {list(present)}"
        )
    trained = trained_modules(trains, spec)
    if all(n in names for n in trained):
        raise ValueError(
            f"freeze={sorted(set(names))} leaves the stage nothing to train (it trains nothing): "
            f"trains={trains!r} trains {list(trained)}; leave at least one of them out of freeze"
        )
    return tuple(n for n in FREEZABLE if n in names)


def apply_freeze(model: nn.Module, freeze: Iterable[str]) -> None:
    """Set ``requires_grad=False`` on every parameter of the named top-level modules of ``model``."""
    for name in freeze:
        if name not in FREEZABLE:
            raise ValueError(f"freeze: unknown module {name!r}; valid choices are {list(FREEZABLE)}")
        module = getattr(model, name, None)
        if module is None:
            raise ValueError(f"freeze: this model has no {name}")
        module.requires_grad_(False)
