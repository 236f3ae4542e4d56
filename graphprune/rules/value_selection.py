"""Ops whose output size depends on their input values: a detector's score threshold and
non-maximum suppression (torchvision's detection models, YOLO exports with NMS in the graph).

- ``NonZero(x)``: the indices of the non-zero elements of ``x``;
- ``Compress(x, condition, axis)``: the slices of ``x`` along ``axis`` where ``condition``
  holds (without ``axis``: elements of the flattened ``x``);
- ``Unique(x, axis)``: the distinct elements (or slices) of ``x``;
- ``NonMaxSuppression(boxes, scores, ...)``: the indices of the boxes kept.

The positions these ops choose are chosen by value, so every axis they compare freezes (a
removed channel would change what is equal, non-zero or kept); ``Compress`` along an axis
passes the other axes through element for element, as a ``Gather`` does. The inputs whose
values choose are declared with :meth:`~graphprune.rules.registry.OpRule.ranks_inputs`: what
is computed after the choice can jump (one more box, another box) when rounding moves a value
across a threshold or a near-tie, and the structural check compares such outputs on further
inputs (:mod:`graphprune.pipeline.ratio`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext

#: the inputs whose values choose the positions, by op
CHOOSING = {"NonZero": (0,), "Compress": (1,), "Unique": (0,), "NonMaxSuppression": (0, 1)}


@register
class ValueSelectionRule(OpRule):
    op_types = tuple(CHOOSING)

    def ranks_inputs(self, node: gs.Node) -> tuple[int, ...]:
        return tuple(i for i in CHOOSING[node.op] if i < len(node.inputs) and node.inputs[i].name)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        reason = f"positions chosen by value at {node.op} '{node.name}'"
        if node.op == "Compress" and node.attrs.get("axis") is not None and node.outputs:
            x, y = node.inputs[0], node.outputs[0]
            ranks = ctx.known_ranks(node, x, y)
            if ranks is not None and ranks[0] == ranks[1]:
                axis = int(node.attrs["axis"]) % ranks[0]
                for t in (x, y):
                    ctx.freeze(t, axis, reason)
                for a in range(ranks[0]):
                    if a != axis:
                        ctx.couple(x, a, y, a)
                ctx.freeze(node.inputs[1], None, reason)
                return
        ctx.freeze_node(node, reason)
