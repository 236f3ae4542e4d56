"""Dependency analysis: which tensor dimensions must lose the same channels.

The public names load lazily, so that the small modules of this package (index maps,
roles, the constant-value lattice) can be imported by the rules without pulling in the
analysis driver, which itself needs the rules.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Analysis": "graphprune.analysis.core",
    "ChannelGroup": "graphprune.analysis.core",
    "Coupling": "graphprune.analysis.core",
    "CouplingContext": "graphprune.analysis.core",
    "Dim": "graphprune.analysis.core",
    "ShapeElement": "graphprune.analysis.core",
    "analyze_graph": "graphprune.analysis.core",
    "describe_node": "graphprune.analysis.core",
    "refine_shapes": "graphprune.analysis.core",
    "PRODUCER": "graphprune.analysis.roles",
    "CONSUMER": "graphprune.analysis.roles",
    "CHANNELWISE": "graphprune.analysis.roles",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphprune.analysis' has no attribute {name!r}")
    return getattr(import_module(module), name)
