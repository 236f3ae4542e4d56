"""DeformConv (ONNX opset 19; torchvision's ``deform_conv2d``, DCNv1 and DCNv2 with a mask).

``Y = DeformConv(X, W, offset, B, mask)``: every output position samples ``X`` at its kernel
taps moved by learned ``offset`` (bilinear), scaled by ``mask`` where given, then weighs them
with ``W[Cout, Cin/g, k...]`` like a Conv. Output channels own ``W`` rows and the bias, as in
a Conv, and so do input channels with ``group == 1`` (``W`` columns). ``offset`` and ``mask``
hold ``offset_group * 2 * prod(k)`` and ``offset_group * prod(k)`` channels: positions, not
features; their axis is frozen (the conv that computes them keeps its outputs). Input channels
are split into ``offset_group`` runs that each follow their own offsets, so with more than one
offset group the input channels stay (a removal would move channels between runs). Not a
linear map of ``X`` that unfolded patches describe (the taps move with the data): the rule
declares no :class:`LinearInfo`, so calibration scores and refits its neighbours, not it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.index_maps import GroupTie
from graphprune.analysis.roles import CONSUMER, PRODUCER
from graphprune.passes.rewrite_context import RewriteContext
from graphprune.rules.conv import mark_spatial, rewrite_group
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from collections.abc import Callable

    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext

_X, _W, _OFFSET, _B, _MASK = range(5)


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


@register
class DeformConvRule(OpRule):
    op_types = ("DeformConv",)
    zero_behaviour = "affine"  # a zero input channel samples zeros wherever the taps move

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Output channel ``o`` is its bias where every input channel it reads is zero (a
        constant other than zero is sampled with the mask and the border's zeros: unknown)."""
        weight = ctx.const(node.inputs[_W])
        bias_t = _present(node, _B)
        bias = ctx.const(bias_t) if bias_t is not None else None
        if weight is None or weight.ndim < 3 or (bias_t is not None and bias is None):
            return [None]
        cout, cin_g = weight.shape[0], weight.shape[1]
        group = int(node.attrs.get("group", 1))
        x = ctx.along(node.inputs[_X], 1)
        if x is None or x.size != cin_g * group or cout % group:
            return [None]
        reads = (weight.reshape(cout, cin_g, -1) != 0).any(axis=2)
        first = (np.arange(cout) // (cout // group)) * cin_g
        xin = x[first[:, None] + np.arange(cin_g)[None, :]]
        zero = (~reads | (xin == 0)).all(axis=1)
        b = np.zeros(cout) if bias is None else bias.astype(np.float64).reshape(-1)
        return [za.values(1, np.where(zero, b, np.nan).astype(np.float32))]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, w, y = node.inputs[_X], node.inputs[_W], node.outputs[0]
        group = int(node.attrs.get("group", 1))
        offset_group = int(node.attrs.get("offset_group", 1))
        ctx.couple(w, 0, y, 1)
        ctx.role(w, 0, PRODUCER)
        bias = _present(node, _B)
        if bias is not None:
            ctx.couple(bias, 0, y, 1)
            ctx.role(bias, 0, PRODUCER)
        for index, what in ((_OFFSET, "offsets"), (_MASK, "mask")):
            t = _present(node, index)
            if t is not None and ctx.rank(t) is not None:
                ctx.freeze(t, 1, f"sampling {what} (per offset group and kernel tap) at {ctx.where()}")
                ctx.spatial(t, [0], "batch")
                ctx.spatial(t, range(2, ctx.rank(t) or 2))
        if offset_group > 1:
            ctx.freeze(x, 1, f"input channels split into {offset_group} offset groups at {ctx.where()}")
        elif group == 1:
            ctx.couple(x, 1, w, 1)
            ctx.role(w, 1, CONSUMER)
        else:
            ctx.couple(x, 1, y, 1, GroupTie(group))
        mark_spatial(ctx, node)

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """Every output element sums ``Cin/g * prod(kernel)`` products (the bilinear sampling
        of each tap not counted)."""
        w, y = shape(node.inputs[_W]), shape(node.outputs[0])
        if w is None or y is None:
            return None
        return math.prod(y) * math.prod(w[1:])

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        rewrite_group(node, ctx, node.inputs[_X])
