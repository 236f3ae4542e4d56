"""The base class of the PyTorch frontend's module handlers (:mod:`.handlers`, :mod:`.duck_handlers`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from graphprune.frontends.torch.errors import PlanMappingError
from torch import nn

__all__ = ["ModuleHandler"]


class ModuleHandler:
    """How one module type is sliced: prunable axes per parameter, attributes to update.

    A handler with ``container = True`` is for a module whose *children* own the
    parameters but which keeps sizes of its own (a head count in a custom attention): its
    :meth:`update` runs after the children were sliced, with ``cuts`` keyed by the
    descendants' names relative to it.
    """

    module_types: tuple[type[nn.Module], ...] = ()
    #: local parameter/buffer name -> axes a plan may cut
    axes: dict[str, tuple[int, ...]] = {}
    container: bool = False

    def check(self, module: nn.Module, cuts: Mapping[str, Mapping[int, np.ndarray]], where: str) -> None:
        for name, by_axis in cuts.items():
            allowed = self.axes.get(name)
            if allowed is None or any(a not in allowed for a in by_axis):
                raise PlanMappingError(
                    f"cannot cut {name} axes {sorted(by_axis)} of {type(module).__name__} "
                    f"'{where}' (prunable: {self.axes or 'none'})"
                )

    def update(
        self, module: nn.Module, cuts: Mapping[str, Mapping[int, np.ndarray]],
        old: Mapping[str, tuple[int, ...]],
    ) -> None:
        """Fix the attributes after slicing (``old`` holds shapes before the cut)."""

    def check_below(self, module: nn.Module, cuts: Mapping[str, Mapping[int, np.ndarray]], where: str) -> None:
        """A container's check, before anything changes: ``cuts`` are keyed by the
        descendants' names relative to ``module``, as :meth:`update` will get them."""
