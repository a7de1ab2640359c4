"""The model's components, one file each; each file ends with a ``FLAVORS`` dict of :class:`Flavor`."""

from cheers_pl.components.flavor import Flavor, apply_overrides

__all__ = ["Flavor", "apply_overrides"]
