"""Pooling and reductions: channels pass through; pooled axes are spatial.

Reduce* over an axis removes that axis: a channel axis that is reduced (a mean over
channels) can be pruned, but not exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.shape_trace import product_of_reads
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.analysis.shape_trace import ShapeSource, ShapeTrace

#: reductions whose value on a constant channel c is c (any count), and those that keep only 0
_REDUCE_KEEPS = ("ReduceMean", "ReduceMax", "ReduceMin")
_REDUCE_KEEPS_ZERO = ("ReduceL1", "ReduceL2", "ReduceSumSquare")
#: ops whose outputs are never negative (a ``ReduceMax`` of them over a pruned axis is exact)
_NONNEGATIVE = ("Abs", "Relu", "Sigmoid", "Softmax", "Exp", "Softplus")


def _spatial(ctx: CouplingContext, tensors: list[gs.Tensor]) -> None:
    for t in tensors:
        rank = ctx.rank(t)
        if rank is not None:
            ctx.spatial(t, [0], "batch")
            ctx.spatial(t, range(2, rank))


def pooled_shape(op: str, attrs: dict, x: list | None) -> list | None:
    """The output shape of a (global) pooling of ``x`` (channels first), for graphs where ONNX
    shape inference stopped before it (``None`` where the sizes are not known)."""
    if x is None or len(x) < 3 or op == "MaxRoiPool":
        return None
    if op.startswith(("Global", "QLinearGlobal")):
        return [*x[:2], *[1] * (len(x) - 2)]
    kernel = attrs.get("kernel_shape")
    if kernel is None or not all(isinstance(d, int) for d in x[2:]) or len(kernel) != len(x) - 2:
        return [*x[:2], *[None] * (len(x) - 2)]
    return [*x[:2], *za.conv_geometry(attrs, kernel, x[2:])[3]]


@register
class PoolRule(OpRule):
    op_types = (
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool", "MaxRoiPool",
    )
    zero_behaviour = "move"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Max and average pooling keep a constant channel (padding is ignored by MaxPool and,
        unless ``count_include_pad``, by AveragePool); Lp pooling keeps only zeros."""
        outs: list[ChannelValues | None] = [None] * len(node.outputs)
        x = ctx.along(node.inputs[0], 1)
        if x is None or node.op == "MaxRoiPool":
            return outs
        if node.op in ("LpPool", "GlobalLpPool"):
            x = za.zeros_only(x)
        elif node.op == "AveragePool" and int(node.attrs.get("count_include_pad", 0)):
            kernel = [int(k) for k in node.attrs.get("kernel_shape", [])]
            if za.conv_is_padded(node, kernel, ctx.shape(node.inputs[0])):
                x = za.zeros_only(x)
        outs[0] = za.values(1, x)
        return outs

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.derive_shape(y, pooled_shape(node.op, node.attrs, ctx.shape(x)))
        ctx.couple(x, 0, y, 0)
        ctx.couple(x, 1, y, 1)
        rank = ctx.rank(x)
        if node.op.startswith("Global") and rank is not None:
            # a global pool reduces every axis after the channels: what reaches them (a
            # LayerNorm that tf2onnx lowers to a GlobalAveragePool over [batch, tokens,
            # hidden]) is reduced like a mean over channels, not cut along an image axis
            ctx.spatial(x, [0], "batch")
            for a in range(2, rank):
                ctx.inexact(x, a, f"{node.op} reduces this axis")
            _spatial(ctx, [y])
        else:
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
    zero_behaviour = "map"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """A channel axis that is not reduced keeps its constants (a sum multiplies them)."""
        x_t = node.inputs[0]
        shape = ctx.shape(x_t)
        state = ctx.state(x_t)
        if shape is None or state is None:
            return [None]
        rank = len(shape)
        if "axes" in node.attrs:
            axes_value = [int(a) for a in node.attrs["axes"]]
        elif ctx.present(node, 1) is not None:
            const = ctx.const(node.inputs[1])
            if const is None:
                return [None]
            axes_value = [int(a) for a in const.reshape(-1)]
        else:
            axes_value = []
        if not axes_value:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                return [state]
            axes_value = list(range(rank))
        axes = {a % rank for a in axes_value}
        if state.axis in axes:
            return [None]
        keepdims = int(node.attrs.get("keepdims", 1))
        axis = state.axis if keepdims else state.axis - sum(1 for a in axes if a < state.axis)
        if node.op in _REDUCE_KEEPS:
            return [za.ChannelValues(axis, state.values)]
        if node.op in _REDUCE_KEEPS_ZERO:
            return [za.values(axis, za.zeros_only(state.values))]
        if node.op == "ReduceSum":
            sizes = [shape[a] for a in axes]
            if any(n is None for n in sizes):
                return [za.values(axis, za.zeros_only(state.values))]
            count = math.prod(sizes)  # type: ignore[arg-type]
            return [za.values(axis, (state.values * count).astype(np.float32))]
        return [None]

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """``ReduceProd`` of a whole shape vector (tf2onnx's einsum merges batch axes with
        it): a product of reads all of size 1 but one is that read."""
        if node.op == "ReduceProd":
            axes = node.attrs.get("axes")
            given = len(node.inputs) > 1 and node.inputs[1].name  # opset 18: axes as an input
            if given:
                axes = trace.const(node.inputs[1])
            whole = (axes is None and not given) or (
                axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] in ([0], [-1]))
            factors = trace.input(node, 0) if whole else None
            if factors is not None:
                return [product_of_reads(factors)]
        return trace.unknown(output)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, x)
        if ranks is None:
            return
        rank = ranks[0]
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
        # computed at run time, the largest of values >= 0 is the same with zeros among them
        # (exact); folded once from the whole tensor, it keeps what removed elements gave it
        exact = (node.op == "ReduceMax" and not ctx.folded and len(x.inputs) == 1
                 and x.inputs[0].op in _NONNEGATIVE)
        out = 0
        for a in range(rank):
            if a in axes:
                if not exact:
                    ctx.inexact(x, a, f"{node.op} reduces this axis")
                if keepdims:
                    out += 1
                continue
            ctx.couple(x, a, y, out)
            out += 1
