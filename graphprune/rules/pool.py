"""Pooling and reductions: channels pass through; pooled axes are spatial.

Reduce* over an axis removes that axis: a channel axis that is reduced (a mean over
channels) can be pruned, but not exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis import CouplingContext


def _spatial(ctx: CouplingContext, tensors: list[gs.Tensor]) -> None:
    for t in tensors:
        rank = ctx.rank(t)
        if rank is not None:
            ctx.spatial(t, [0], "batch")
            ctx.spatial(t, range(2, rank))


@register
class PoolRule(OpRule):
    op_types = (
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool", "MaxRoiPool",
    )
    zero_behaviour = "zero"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple(x, 0, y, 0)
        ctx.couple(x, 1, y, 1)
        _spatial(ctx, [x, y])
        for extra in node.outputs[1:]:
            if extra.outputs:
                ctx.freeze_node(node, f"pooling indices used at {node.op} '{node.name}'")


@register
class ReduceRule(OpRule):
    op_types = (
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    )

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = ctx.rank(x)
        if rank is None:
            ctx.freeze_node(node, f"rank unknown at {node.op} '{node.name}'")
            return
        axes_value = None
        if "axes" in node.attrs:
            axes_value = list(node.attrs["axes"])
        elif len(node.inputs) > 1 and node.inputs[1].name:
            const = ctx.const(node.inputs[1])
            if const is None:
                ctx.freeze_node(node, f"reduction axes not constant at {node.op} '{node.name}'")
                return
            axes_value = [int(a) for a in const.reshape(-1)]
        if not axes_value:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                ctx.couple_all_axes(x, y)
                return
            axes_value = list(range(rank))
        axes = sorted({int(a) % rank for a in axes_value})
        keepdims = int(node.attrs.get("keepdims", 1))
        out = 0
        for a in range(rank):
            if a in axes:
                ctx.inexact(x, a, f"{node.op} reduces this axis")
                if keepdims:
                    out += 1
                continue
            ctx.couple(x, a, y, out)
            out += 1
