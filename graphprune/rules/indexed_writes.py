"""Ops that write at positions given by values, with every other axis passing through.

``TensorScatter`` (opset 24: a key/value cache update) writes ``update [B, ..., s, ...]`` into
``past_cache [B, ..., S, ...]`` along the sequence ``axis`` at each batch entry's
``write_indices`` (``linear`` or ``circular``), giving ``present_cache`` of the cache's shape.
The batch axis and the sequence axis are positions (frozen); every other axis (heads, head
size, channels) couples element for element across the cache, the update and the output, so
a head of the cache prunes with the head that fills it. A channel that is the same constant
in the cache and the update stays that constant.

``ScatterND`` writes ``updates`` into ``data`` at the positions ``indices [..., k]`` name in
data's first ``k`` axes; data's other axes pass through element for element into the
updates' trailing axes and the output (a torch export's in-place cache write ``buf[0] = x``:
the channels of ``x`` prune with the buffer's). ``ScatterElements`` (``Scatter`` before opset
11) writes each update along ``axis`` at the position its index names; its other axes are
element for element across data, indices, updates and output where all four have data's
extent. The written axes are positions (frozen); the indices are never read as channels.

``OneHot`` turns ``indices`` of rank ``r`` into an output of rank ``r + 1`` whose new ``axis``
has ``depth`` positions (``values[1]`` at the index, ``values[0]`` elsewhere): the index axes
pass through, the new axis counts classes chosen by value (frozen), and ``depth`` and
``values`` carry no channel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext


@register
class TensorScatterRule(OpRule):
    op_types = ("TensorScatter",)
    since_opset = 24
    zero_behaviour = "map"

    def _axis(self, node: gs.Node, rank: int) -> int:
        return int(node.attrs.get("axis", -2)) % rank

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        cache, update, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ranks = ctx.known_ranks(node, cache, update, y)
        if ranks is None:
            return
        rank = ranks[0]
        axis = self._axis(node, rank)
        if ranks != [rank] * 3 or rank < 2 or axis == 0:
            ctx.freeze_node(node, f"TensorScatter '{node.name}' not understood (ranks {ranks}, axis {axis})")
            return
        for t in (cache, update, y):
            ctx.spatial(t, [0], "batch")
            ctx.spatial(t, [axis], "sequence")
        for a in range(1, rank):
            if a != axis:
                ctx.couple(cache, a, y, a)
                ctx.couple(update, a, y, a)
        for t in node.inputs[2:]:
            ctx.freeze(t, None, f"write positions at {node.op} '{node.name}'")

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        state, shape = ctx.state(node.inputs[0]), ctx.shape(node.inputs[0])
        if state is None or shape is None or state.axis in (0, self._axis(node, len(shape))):
            return [None]
        other = ctx.along(node.inputs[1], state.axis)
        if other is None or other.size != state.values.size:
            return [None]
        return [za.values(state.axis, np.where(state.values == other, state.values, np.nan))]


@register
class ScatterNDRule(OpRule):
    op_types = ("ScatterND",)

    def sums_in_thread_order(self, node: gs.Node) -> bool:
        """``reduction`` add or mul: repeated indices are summed in an order the threads decide."""
        reduction = node.attrs.get("reduction", "none")
        return (reduction.decode() if isinstance(reduction, bytes) else str(reduction)) in ("add", "mul")

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        data, indices, updates, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
        ranks = ctx.known_ranks(node, data, indices, updates, y)
        if ranks is None:
            return
        rd, ri, ru, ry = ranks
        depth = ctx.size(indices, ri - 1)
        if depth is None or ry != rd or ru != ri - 1 + rd - depth:
            ctx.freeze_node(node, f"{node.op} '{node.name}' not understood (ranks {ranks}, index depth {depth})")
            return
        reason = f"written positions at {node.op} '{node.name}'"
        for a in range(depth):
            ctx.freeze(data, a, reason)
            ctx.freeze(y, a, reason)
        for a in range(ri):
            ctx.freeze(indices, a, reason)
        for a in range(ri - 1):
            ctx.freeze(updates, a, reason)
        for a in range(depth, rd):
            ctx.couple(data, a, y, a)
            ctx.couple(updates, ri - 1 + a - depth, y, a)


@register
class ScatterElementsRule(OpRule):
    op_types = ("ScatterElements", "Scatter")

    def sums_in_thread_order(self, node: gs.Node) -> bool:
        """``reduction`` add or mul: repeated indices are summed in an order the threads decide."""
        reduction = node.attrs.get("reduction", "none")
        return (reduction.decode() if isinstance(reduction, bytes) else str(reduction)) in ("add", "mul")

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        data, indices, updates, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
        ranks = ctx.known_ranks(node, data, indices, updates, y)
        if ranks is None:
            return
        if len(set(ranks)) != 1:
            ctx.freeze_node(node, f"{node.op} '{node.name}' not understood (ranks {ranks})")
            return
        rank = ranks[0]
        axis = int(node.attrs.get("axis", 0)) % rank
        reason = f"written positions at {node.op} '{node.name}'"
        tensors = (data, indices, updates, y)
        for a in range(rank):
            sizes = {ctx.member_size(t, a) for t in tensors}
            if a == axis or len(sizes) != 1 or None in sizes:  # (a smaller index extent writes a part)
                for t in tensors:
                    ctx.freeze(t, a, reason)
                continue
            for t in tensors[:3]:
                ctx.couple(t, a, y, a)


@register
class OneHotRule(OpRule):
    op_types = ("OneHot",)
    since_opset = 9

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        indices, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, indices, y)
        if ranks is None:
            return
        rank, out_rank = ranks
        if out_rank != rank + 1:
            ctx.freeze_node(node, f"OneHot '{node.name}' not understood (ranks {rank} -> {out_rank})")
            return
        axis = int(node.attrs.get("axis", -1)) % out_rank
        ctx.freeze(y, axis, f"classes of {node.op} '{node.name}'")
        for a in range(rank):
            ctx.couple(indices, a, y, a if a < axis else a + 1)
        for t in node.inputs[1:]:
            ctx.freeze(t, None, f"depth and values of {node.op} '{node.name}'")
