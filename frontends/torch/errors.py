"""The errors of the PyTorch frontend (both are :class:`~graphprune.errors.GraphPruneError`)."""

from __future__ import annotations

from graphprune.errors import GraphPruneError

__all__ = ["ExportError", "PlanMappingError"]


class ExportError(GraphPruneError):
    """The framework exporter failed, or its output cannot be mapped to the module."""


class PlanMappingError(GraphPruneError):
    """A plan cuts something that is not a whole slice of a module parameter."""
