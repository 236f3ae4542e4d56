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

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.rules.conv import ConvRule
from graphprune.rules.registry import LinearInfo, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext

_X, _W, _OFFSET, _B, _MASK = range(5)


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


@register
class DeformConvRule(ConvRule):
    """A Conv's couplings for ``X``, ``W`` and the bias (input 3), with the offset and mask
    channels frozen and, with several offset groups, the input channels too."""

    op_types = ("DeformConv",)
    bias_index = _B

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
        super().couple(node, ctx)
        for index, what in ((_OFFSET, "offsets"), (_MASK, "mask")):
            t = _present(node, index)
            if t is not None and ctx.rank(t) is not None:
                ctx.freeze(t, 1, f"sampling {what} (per offset group and kernel tap) at {ctx.where()}")
                ctx.spatial(t, [0], "batch")
                ctx.spatial(t, range(2, ctx.rank(t) or 2))
        offset_group = int(node.attrs.get("offset_group", 1))
        if offset_group > 1:
            ctx.freeze(node.inputs[_X], 1, f"input channels split into {offset_group} offset groups at {ctx.where()}")

    def linear(self, node: gs.Node) -> LinearInfo | None:
        return None  # the taps move with the data: no unfolded patches describe it

    def prunes_by_position(self, node: gs.Node) -> bool:
        return False
