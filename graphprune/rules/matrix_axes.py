"""Ops that treat the last two axes as a matrix and pass every leading axis through.

``Trilu`` keeps the upper or lower triangle of each ``[N, M]`` matrix in ``x [..., N, M]``
(torch's ``triu``/``tril``: causal masks, masked attention scores). Whether an element is
kept depends on its row and column *index* (``j - i`` against ``k``): removing a row or a
column shifts the indices of those after it, so both matrix axes freeze; each leading axis
(batch, heads, channels) passes through element for element. A zero channel stays zero; a
non-zero constant does not (the cut-off triangle becomes 0).

``Det`` maps ``x [..., M, M]`` to ``[...]``: the leading axes pass through, the matrix axes
freeze (a determinant does not decompose by rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext


def _leading_axes(node: gs.Node, ctx: CouplingContext, *, squeezed: bool) -> None:
    """Couple the leading axes of input 0 and output 0; freeze the last two axes (of the
    output too, unless ``squeezed``: it has only the leading axes)."""
    x, y = node.inputs[0], node.outputs[0]
    ranks = ctx.known_ranks(node, x, y)
    if ranks is None:
        return
    rank, out_rank = ranks
    if rank < 2 or out_rank != (rank - 2 if squeezed else rank):
        ctx.freeze_node(node, f"{node.op} '{node.name}' not understood (ranks {rank} -> {out_rank})")
        return
    reason = f"matrix axis at {node.op} '{node.name}'"
    for axis in (rank - 2, rank - 1):
        ctx.freeze(x, axis, reason)
        if not squeezed:
            ctx.freeze(y, axis, reason)
    for axis in range(rank - 2):
        ctx.couple(x, axis, y, axis)
    for t in node.inputs[1:]:
        ctx.freeze(t, None, f"diagonal offset at {node.op} '{node.name}'")


@register
class TriluRule(OpRule):
    op_types = ("Trilu",)
    since_opset = 14
    zero_behaviour = "map"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        _leading_axes(node, ctx, squeezed=False)

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        state, shape = ctx.state(node.inputs[0]), ctx.shape(node.inputs[0])
        if state is None or shape is None or state.axis >= len(shape) - 2:
            return [None]
        return [za.values(state.axis, za.zeros_only(state.values))]


@register
class DetRule(OpRule):
    op_types = ("Det",)
    since_opset = 11

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        _leading_axes(node, ctx, squeezed=True)
