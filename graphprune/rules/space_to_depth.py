"""SpaceToDepth: spatial blocks move into the channels.

``x [N, C, H, W] -> y [N, C*b², H/b, W/b]`` with block size ``b``: ONNX stacks the ``b x b``
positions of a block in front of the channels, so output channel ``(i*b + j)*C + c`` holds
input channel ``c`` at block position ``(i, j)``. The output channel axis is the merged axis
``(b, b, C)`` with the input channel as its inner factor: ``y[oc] <-> x[oc % C]``, an index
map ``Digit(1)``. Removing input channel ``c`` removes its ``b²`` output channels (one unit),
and the kept channels keep the same layout with a smaller ``C``: the block size stays and no
rewrite is needed. The op only moves data: output channel ``oc`` is whatever constant input
channel ``oc % C`` is (``zero_output``) and has its RMS (``propagate_rms``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants
from graphprune.analysis.index_maps import Digit
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.rules.scale import ScaleContext


@register
class SpaceToDepthRule(OpRule):
    op_types = ("SpaceToDepth",)
    zero_behaviour = "move"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        block = int(node.attrs.get("blocksize", 0))
        if ctx.rank(x) != 4 or ctx.rank(y) != 4 or block < 1:
            ctx.freeze_node(node, f"SpaceToDepth '{node.name}' not understood")
            return
        ctx.couple(x, 0, y, 0)
        ctx.couple(x, 1, y, 1, Digit(1))  # x is the factor, y the merged axis
        for t in (x, y):  # (axis 0 passes through as it is: after a Transpose it can hold
            ctx.spatial(t, [2, 3])  # channels, tf2onnx's dilated convolution)

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Output channel ``oc`` carries input channel ``oc % C``: the vector, ``b²`` times."""
        block = int(node.attrs.get("blocksize", 0))
        x = ctx.along(node.inputs[0], 1)
        if x is None or block < 1:
            return [None]
        return [constants.values(1, np.tile(x, block * block))]

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        block = int(node.attrs.get("blocksize", 0))
        shape = node.inputs[0].shape or []
        channels = shape[1] if len(shape) == 4 else None
        if not isinstance(channels, int) or block < 1:
            return None
        return np.tile(ctx.of(node.inputs[0], channels), block * block)
