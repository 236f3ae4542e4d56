"""The vocabulary every stage of the dependency analysis shares.

A *dimension* ``(tensor name, axis)`` is a node of the dependency graph. A :class:`Coupling`
is an edge: two dimensions that lose channels together, their indices related by an index
map. A :class:`ShapeElement` is a literal in a shape input (a Reshape target, an Expand
shape) that gives the size of a dimension, so the rewrite writes the new size there.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphprune.analysis.index_maps import IndexMap

#: the sizes an open batch axis takes in the two shape probes (:mod:`.shape_probe`)
BATCH_PROBE = (2, 3)

Dim = tuple[str, int]


def describe_node(node: gs.Node) -> str:
    """``Conv 'layer1.conv'``: how messages name a node."""
    return f"{node.op} '{node.name}'"


@dataclass(frozen=True)
class ShapeElement:
    """Element ``element`` of input ``input_index`` of ``node`` must equal the size of ``dim``."""

    node_name: str
    input_index: int
    element: int
    dim: Dim


@dataclass(frozen=True)
class Coupling:
    """Dimensions ``a`` and ``b`` lose channels together, indices related by ``imap``.

    ``exact``: removing the channels equals zeroing them; ``node``: the node that couples.
    """

    a: Dim
    b: Dim
    imap: IndexMap
    exact: bool
    node: str
