"""A flavor is two plain functions: ``config(**overrides)`` (cheap) and ``build(config)`` (heavy).

Splitting them lets :class:`cheers_pl.model.CheersModel` check that the sizes of all components
agree before any weight is allocated or read from disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flavor:
    """One named way to make a component.

    Attributes:
        config: ``config(**overrides) -> cfg``; reads at most a JSON file, never weights.
        build: ``build(cfg) -> nn.Module`` (a tokenizer for the tokenizer kind); allocates or loads weights.
        doc: one line for ``--help`` and error messages.
    """

    config: Callable[..., Any]
    build: Callable[[Any], Any]
    doc: str = ""

    def __call__(self, **overrides: Any) -> Any:
        return self.build(self.config(**overrides))


def apply_overrides(
    base: Mapping[str, Any], overrides: Mapping[str, Any], valid: Iterable[str], where: str
) -> dict[str, Any]:
    """Return ``base`` updated with ``overrides``, refusing keys that are not in ``valid``.

    Library config classes (``Qwen2Config`` and friends) accept any keyword silently; a typo
    in an override would then change nothing. This fails instead, naming the valid keys.
    """
    valid = set(valid)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown override(s) {unknown}; valid keys are {sorted(valid)}")
    return {**base, **overrides}
