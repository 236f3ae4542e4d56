"""Dependency analysis: which tensor dimensions must lose the same channels.

Modules, in the order the analysis runs:

- :mod:`.shape_probe`: static sizes that shape inference leaves symbolic;
- :mod:`.coupling`: the context op rules call to state couplings, roles, frozen axes;
- :mod:`.shape_trace`: where the elements of computed shape inputs come from;
- :mod:`.groups`: channel groups and their units;
- :mod:`.driver`: :func:`analyze_graph`, which runs the rules (it imports the registry);
- :mod:`.constants`: the constant-channel lattice the rules compute on (a leaf);
- :mod:`.zero_analysis`: runs the rules' ``zero_output`` and finds lossless units;
- :mod:`.dims`, :mod:`.index_maps`, :mod:`.roles`: the shared vocabulary.

The rules import only the leaves (vocabulary, constant lattice, coupling context, shape
trace), never the driver or :mod:`.zero_analysis`. The public names load lazily, so that
importing one leaf does not pull in the driver.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Analysis": "graphprune.analysis.driver",
    "analyze_graph": "graphprune.analysis.driver",
    "ChannelGroup": "graphprune.analysis.groups",
    "CouplingContext": "graphprune.analysis.coupling",
    "Coupling": "graphprune.analysis.dims",
    "Dim": "graphprune.analysis.dims",
    "ShapeElement": "graphprune.analysis.dims",
    "describe_node": "graphprune.analysis.dims",
    "refine_shapes": "graphprune.analysis.shape_probe",
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
